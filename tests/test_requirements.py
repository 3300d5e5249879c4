"""The versions CI tests lie inside what requirements.txt lets users install."""

import os

from conftest import PACK_DIR
from packaging.requirements import Requirement


def _read(name):
    with open(os.path.join(PACK_DIR, name)) as handle:
        lines = [line.split("#")[0].strip() for line in handle]
    return {Requirement(line).name.lower(): Requirement(line) for line in lines if line}


def test_tested_versions_satisfy_requirements_txt():
    user, tested = _read("requirements.txt"), _read("requirements-test.txt")
    for name, requirement in user.items():
        assert name in tested, f"{name} is in requirements.txt but CI does not install it"
        pinned = next(iter(tested[name].specifier)).version
        assert requirement.specifier.contains(pinned), f"CI tests {name}=={pinned}, outside {requirement}"
    assert "tpu" in user["jax"].extras


def test_requirements_keep_both_huggingface_hub_generations():
    # transformers 4.x needs huggingface-hub < 1 and 5.x needs >= 1; a ComfyUI venv may hold
    # either, so nothing we require may force one (diffusers >= 0.40 needs hub >= 1.23).
    user = _read("requirements.txt")
    assert user["huggingface-hub"].specifier.contains("0.36.0")
    assert user["huggingface-hub"].specifier.contains("1.33.0")
    assert not user["diffusers"].specifier.contains("0.40.0")
    assert user["transformers"].specifier.contains("4.57.6") and user["transformers"].specifier.contains("5.23.0")


def test_transformers4_pins_differ_only_in_the_hub_generation():
    tested, older = _read("requirements-test.txt"), _read("requirements-test-transformers4.txt")
    assert set(tested) == set(older)
    differing = {name for name in tested if str(tested[name].specifier) != str(older[name].specifier)}
    assert differing == {"transformers", "huggingface-hub", "tokenizers"}
    user = _read("requirements.txt")
    for name in ("transformers", "huggingface-hub"):
        assert user[name].specifier.contains(next(iter(older[name].specifier)).version)


def test_pyproject_lists_what_requirements_txt_lists_for_the_comfy_registry():
    import tomllib

    with open(os.path.join(PACK_DIR, "pyproject.toml"), "rb") as handle:
        pyproject = tomllib.load(handle)
    project = pyproject["project"]
    with open(os.path.join(PACK_DIR, "requirements.txt")) as handle:
        lines = [line.split("#")[0].strip() for line in handle]
    assert [str(Requirement(line)) for line in project["dependencies"]] == [str(Requirement(line)) for line in lines if line]
    assert "comfyui" not in project["name"].lower()  # the registry refuses such names
    assert project["version"] and project["description"]
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Wan 2.1 TPU"
