"""Test set-up: 8 fake CPU devices, the pack imported as ComfyUI imports it,
and one tiny Wan 2.1 model (plus diffusers' own outputs on it) per session."""

import os

# Before anything imports jax: 8 CPU devices stand in for a v6e-8.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WAN_TPU_COMPILE_CACHE", "0")  # tests count compilations; a test opts in

import sys

import pytest

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PACK_DIR not in sys.path:
    sys.path.append(PACK_DIR)  # last: nothing the environment already provides is shadowed
from pack_loader import PACK_NAME, load_pack, pack_module  # noqa: E402  the pack, as ComfyUI imports it


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    tiny_wan = pack_module("tiny_wan")
    return tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan21")


@pytest.fixture(scope="session")
def manager():
    return pack_module("env_manager").TorchaxEnvManager.instance()


@pytest.fixture(scope="session")
def a14b_dir(tmp_path_factory):
    """A tiny Wan 2.2 T2V A14B-style folder: two experts, switching at 60% of the timesteps."""
    tiny_wan = pack_module("tiny_wan")
    return tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan22-a14b", tiny_wan.TINY_A14B)


def diffusers_wan_pipeline(path, flow_shift: float | None = None):
    """diffusers' WanPipeline (fp32) on a tiny folder, progress bar off, optionally at another flow_shift."""
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if flow_shift is not None:
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    return pipe


TINY_VIDEO = dict(height=32, width=48, num_frames=5)


def lowered_tiny_cfg_step(pipe, layout: str) -> str:
    """The StableHLO text of ``pipe``'s denoising step with CFG in ``layout``, at TINY_VIDEO (one
    1-step run first compiles it)."""
    pipe.generate("a cat", "blurry", num_inference_steps=1, guidance_scale=5.0, seed=0, flow_shift=3.0,
                  layout=layout, **TINY_VIDEO)
    step_program = pack_module("sampling.step_program")
    program = pipe.transformer().step_fns[step_program.StepKind(cfg=True, layout=layout)]
    sample_shape = pack_module("models.wan.latents").WAN21.latent_shape(**TINY_VIDEO)
    return program.jitted.lower(*program.abstract_args(sample_shape, 512, "float32")).as_text()


def cached_diffusers_runs(pipe):
    """``frames(prompt, negative_prompt, seed, guidance_scale, steps, flow_shift=3.0, **video)`` of
    ``pipe`` (a diffusers WanPipeline), each distinct run computed once."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    cache = {}

    def frames(prompt, negative_prompt, seed, guidance_scale, steps, flow_shift=3.0, **video):
        key = (prompt, negative_prompt, seed, guidance_scale, steps, flow_shift, tuple(sorted(video.items())))
        if key not in cache:
            pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
            cache[key] = pipe(
                prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np", **(video or TINY_VIDEO),
            ).frames[0]
        return cache[key]

    frames.pipe = pipe
    return frames


@pytest.fixture(scope="session")
def diffusers_frames(tiny_model_dir):
    """diffusers' PyTorch WanPipeline (fp32) on the tiny model."""
    import torch
    from diffusers import WanPipeline

    return cached_diffusers_runs(WanPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32))


@pytest.fixture(scope="session")
def diffusers_bf16_frames(tiny_model_dir):
    """diffusers' WanPipeline in bf16 as its docs run Wan (text encoder and transformer in bf16,
    the VAE in fp32), on the tiny model."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(tiny_model_dir, subfolder="vae", torch_dtype=torch.float32)
    return cached_diffusers_runs(WanPipeline.from_pretrained(tiny_model_dir, vae=vae, torch_dtype=torch.bfloat16))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow_tpu_compile: compiles a whole real-size Wan program for TPU (minutes on 2 cores); "
        "deselected unless selected with -m slow_tpu_compile",
    )


# The longest files first, so that with pytest-xdist (scripts/test.sh: a file per worker at a time) no
# worker is left running a long file alone at the end. The order within a file is kept.
LONGEST_FILES_FIRST = ("test_tpu_compile.py", "test_image_to_video.py", "test_cli.py", "test_nodes.py", "test_first_last_frame.py",
                       "test_sequence_layout.py", "test_sharded_vae.py", "test_families.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    if "slow_tpu_compile" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("slow_tpu_compile")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("slow_tpu_compile")]
