"""Queue an API-format workflow on a running ComfyUI, wait, print where the video went.

    python examples/queue_workflow.py examples/api/wan21_tpu_480p_api.json \
        --prompt "a red fox running through snow" --server http://127.0.0.1:8188

Standard library only. --prompt, --seed, --steps and --model-id change every
node input of that name before queuing.
"""

import argparse
import json
import os
import sys
import time
import urllib.request
import uuid


def _request(server: str, path: str, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(server.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:  # ComfyUI explains a refused prompt in the body
        raise SystemExit(f"{path} failed ({error.code}): {error.read().decode(errors='replace')}") from None


def override_inputs(workflow: dict, **values) -> dict:
    """Set each given input on every node that has an input of that name."""
    for node in workflow.values():
        for name, value in values.items():
            if value is not None and name in node.get("inputs", {}):
                node["inputs"][name] = value
    return workflow


def output_files(history_entry: dict) -> list[str]:
    """Paths (relative to ComfyUI's output folder) of the files a finished prompt wrote."""
    files = []
    for node_output in history_entry.get("outputs", {}).values():
        for items in node_output.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    files.append(os.path.join(item.get("subfolder", ""), item["filename"]))
    return files


def queue_and_wait(server: str, workflow: dict, timeout: float = 3600.0) -> list[str]:
    client_id = uuid.uuid4().hex
    prompt_id = _request(server, "/prompt", {"prompt": workflow, "client_id": client_id})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = _request(server, f"/history/{prompt_id}") or {}
        entry = history.get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("status_str") == "error":  # a failed prompt is in the history, not completed
            raise SystemExit(f"the workflow failed: {json.dumps(status.get('messages', []))[:2000]}")
        if entry and status.get("completed", True):
            return output_files(entry)
        time.sleep(1.0)
    raise SystemExit(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="API-format workflow JSON (examples/api/*.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--model-id")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    with open(args.workflow) as handle:
        workflow = json.load(handle)
    override_inputs(workflow, prompt=args.prompt, seed=args.seed, num_inference_steps=args.num_inference_steps,
                    model_id=args.model_id)
    files = queue_and_wait(args.server, workflow, args.timeout)
    for path in files:
        sys.stdout.write(f"output/{path}\n")
    return files


if __name__ == "__main__":
    main()
