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


def test_tiny_two_expert_family_runs(tmp_path, manager):
    output = tmp_path / "a14b.mp4"
    cli.main(["a fox", "--tiny", "--tiny-family", "wan2.2-t2v-a14b", "--steps", "3", "--frames", "5", "--height", "32",
              "--width", "48", "--guidance-2", "3.0", "--output", str(output)])
    assert os.path.getsize(output) > 0


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

