"""A follower for a TPU slice of several hosts: run this on every host but host 0 (where ComfyUI runs).

    python worker.py --coordinator HOST0:8476 --num-processes 4 --process-id 1

It joins JAX's multi-controller runtime at ComfyUI's coordinator and then runs every stage ComfyUI runs,
over the one global mesh, until ComfyUI tells it to stop (``runtime.multihost``). Model folders must be at
the same paths on every host. Exits 0 when told to stop, 1 when ``--idle-exit`` passed with no call, and
lets an error end it otherwise (the leader then names this process and host).
"""

import argparse
import logging
import os
import sys

from pack_loader import pack_module  # this folder is on sys.path: the script lives in it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", required=True, help="host 0's HOST:PORT (ComfyUI's WAN_TPU_COORDINATOR)")
    parser.add_argument("--num-processes", type=int, required=True, help="the number of hosts, host 0 included")
    parser.add_argument("--process-id", type=int, required=True, help="this host's id, 1 to num-processes - 1")
    parser.add_argument("--follower-timeout", type=float, default=None,
                        help="seconds the leader waits for an answer (WAN_TPU_FOLLOWER_TIMEOUT; default 30)")
    parser.add_argument("--join-timeout", type=int, default=None,
                        help="seconds to wait for every process to join (WAN_TPU_JOIN_TIMEOUT; default 300)")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="exit after this many seconds with no call (default: wait while the leader lives)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.process_id < 1:
        parser.error(f"--process-id {args.process_id}: followers are 1 to {args.num_processes - 1}; "
                     f"process 0 is ComfyUI")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    environment = pack_module("runtime.environment")
    # This process's own settings, read where every other process reads them (TorchaxEnvManager.start).
    os.environ[environment.COORDINATOR] = args.coordinator
    os.environ[environment.NUM_PROCESSES] = str(args.num_processes)
    os.environ[environment.PROCESS_ID] = str(args.process_id)
    if args.follower_timeout is not None:
        os.environ[environment.FOLLOWER_TIMEOUT] = str(args.follower_timeout)
    if args.join_timeout is not None:
        os.environ[environment.JOIN_TIMEOUT] = str(args.join_timeout)
    return pack_module("runtime.multihost").serve(idle_limit_s=args.idle_exit)


if __name__ == "__main__":
    sys.exit(main())
