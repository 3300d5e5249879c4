"""The command line runs end to end on a tiny model it builds itself."""

import os

import pytest

from conftest import pack_module

cli = pack_module("cli")


def test_tiny_run_writes_an_mp4_with_euler_and_magcache(tmp_path, manager):
    output = tmp_path / "tiny.mp4"
    path = cli.main(["a fox", "--tiny", "--steps", "3", "--frames", "5", "--height", "32", "--width", "48",
                     "--sampler", "euler", "--output", str(output)])
    assert path == str(output) and os.path.getsize(output) > 0


def test_timesteps_set_the_step_count():
    args = cli.parse_args(["--tiny", "--sampler", "euler", "--timesteps", "1000,750,500,250"])
    assert args.timesteps == [1000.0, 750.0, 500.0, 250.0] and args.steps == 4


def test_tiny_two_expert_family_runs_and_calibrates_magcache(tmp_path, manager, monkeypatch):
    output = tmp_path / "a14b.mp4"
    monkeypatch.setenv("WAN_TPU_MAGCACHE_DIR", str(tmp_path / "magcache"))
    cli.main(["a fox", "--tiny", "--tiny-family", "wan2.2-t2v-a14b", "--steps", "3", "--frames", "5", "--height", "32",
              "--width", "48", "--guidance-2", "3.0", "--magcache-calibrate", "--output", str(output)])
    assert os.path.getsize(output) > 0
    (saved,) = (tmp_path / "magcache").iterdir()
    assert saved.name.startswith("tiny-wan2.2-t2v-a14b-") and '"mag_ratios"' in saved.read_text()


def test_expert_loras_on_the_command_line():
    args = cli.parse_args(["--tiny", "--lora", "style.safetensors:0.5", "--lora-high", "high.safetensors",
                           "--lora-low", "low.safetensors:0.8"])
    assert [(spec.path, spec.strength, spec.expert) for spec in args.lora] == [
        ("style.safetensors", 0.5, "both"), ("high.safetensors", 1.0, "high_noise"),
        ("low.safetensors", 0.8, "low_noise")]


def test_tiny_image_to_video_runs_from_an_image_file(tmp_path, manager):
    import numpy as np
    from PIL import Image

    picture = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(picture)
    output = tmp_path / "i2v.mp4"
    cli.main(["a fox", "--tiny", "--tiny-family", "wan2.2-i2v-a14b", "--image", str(picture), "--steps", "2",
              "--frames", "5", "--height", "32", "--width", "48", "--output", str(output)])
    assert os.path.getsize(output) > 0


def test_an_unreadable_image_is_named(tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    with pytest.raises(SystemExit, match="--image .*notes.txt.*cannot read it as an image"):
        cli.load_image(str(not_an_image))

