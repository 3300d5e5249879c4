"""Compat alias, mesh construction and import hygiene (no model needed)."""

import subprocess
import sys
import types

import pytest
from conftest import PACK_DIR, PACK_NAME, pack_module

env_manager = pack_module("env_manager")


def test_compat_aliases_missing_dimname_overloads_so_torchax_imports():
    import torch

    env_manager.apply_torch_compat()
    # Every overload torchax names now resolves, to its positional sibling where torch lacks it.
    for (op, overload), sibling in env_manager.TORCH_DIMNAME_ALIASES.items():
        packet = getattr(torch.ops.aten, op)
        assert getattr(packet, overload) is not None
        if overload not in packet.overloads():
            assert getattr(packet, overload) is getattr(packet, sibling)
    import torchax  # noqa: F401  (fails on torch 2.13 without the aliases)


def test_compat_does_nothing_where_torch_still_has_the_overloads():
    class Packet:
        def __init__(self, names):
            self._names = names
            for name in names:
                setattr(self, name, object())

        def overloads(self):
            return list(self._names)

    full = {}
    for (op, overload), sibling in env_manager.TORCH_DIMNAME_ALIASES.items():
        full.setdefault(op, set()).update({overload, sibling})
    namespace = types.SimpleNamespace(**{op: Packet(sorted(names)) for op, names in full.items()})
    before = {op: dict(vars(packet)) for op, packet in vars(namespace).items()}
    assert env_manager.apply_torch_compat(namespace) == []
    assert {op: dict(vars(packet)) for op, packet in vars(namespace).items()} == before


def test_compat_on_an_old_torch_aliases_only_what_is_missing():
    class Packet:
        def __init__(self, names):
            self._names = list(names)
            for name in names:
                setattr(self, name, f"overload:{name}")

        def overloads(self):
            return list(self._names)

    namespace = types.SimpleNamespace(prod=Packet(["default", "dim_int"]), unbind=Packet(["int", "Dimname"]))
    added = env_manager.apply_torch_compat(namespace)
    assert added == ["prod.dim_Dimname"]
    assert namespace.prod.dim_Dimname == "overload:dim_int"
    assert namespace.unbind.Dimname == "overload:Dimname"


@pytest.mark.parametrize("devices, expected", [(1, (1, 1)), (2, (2, 1)), (4, (2, 2)), (8, (2, 4)), (3, (1, 3))])
def test_default_mesh_shape(devices, expected):
    assert env_manager.resolve_mesh_shape(devices, environ={}) == expected


def test_mesh_overrides_by_argument_and_environment():
    assert env_manager.resolve_mesh_shape(8, dp=1, environ={}) == (1, 8)
    assert env_manager.resolve_mesh_shape(8, tp=8, environ={}) == (1, 8)
    assert env_manager.resolve_mesh_shape(8, dp=4, tp=2, environ={}) == (4, 2)
    assert env_manager.resolve_mesh_shape(8, environ={"WAN_TPU_DP": "4"}) == (4, 2)
    assert env_manager.resolve_mesh_shape(8, environ={"WAN_TPU_TP": "2"}) == (4, 2)
    # An argument wins over the environment.
    assert env_manager.resolve_mesh_shape(8, dp=1, environ={"WAN_TPU_DP": "4"}) == (1, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dp=3), "dp=3 does not divide the 8 devices"),
        (dict(tp=3), "tp=3 does not divide the 8 devices"),
        (dict(dp=2, tp=2), "dp=2 x tp=2 = 4, but 8 devices"),
        (dict(dp=-1), "dp=-1"),
        (dict(dp="two"), "dp='two' is not an integer"),
    ],
)
def test_bad_mesh_overrides_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        env_manager.resolve_mesh_shape(8, environ={}, **kwargs)


def test_bad_mesh_in_environment_is_reported():
    with pytest.raises(ValueError, match="dp=5 does not divide"):
        env_manager.resolve_mesh_shape(8, environ={"WAN_TPU_DP": "5"})


@pytest.mark.parametrize("count, shape", [(1, (1, 1)), (2, (2, 1)), (4, (2, 2)), (8, (2, 4))])
def test_build_mesh_on_fake_cpu_devices(count, shape):
    import jax

    mesh = env_manager.build_mesh(jax.devices()[:count])
    assert mesh.axis_names == ("dp", "tp")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.devices.size == count


def test_manager_mesh_is_built_once_per_shape(manager):
    assert manager.mesh() is manager.mesh()
    assert dict(manager.mesh().shape) == {"dp": 2, "tp": 4}
    assert dict(manager.mesh(dp=1).shape) == {"dp": 1, "tp": 8}
    with pytest.raises(ValueError, match="dp=3 x tp=3 = 9, but 8 devices"):
        manager.mesh(dp=3, tp=3)


def _imports_after(statement: str) -> set:
    code = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {PACK_DIR!r})\n"
        f"{statement}\n"
        "print(','.join(m for m in ('jax', 'torchax', 'torch', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(filter(None, result.stdout.strip().split(",")))


def test_importing_env_manager_imports_neither_jax_nor_torchax():
    # env_manager alone, as a module of the pack (its imports are relative), the pack's __init__ not run.
    statement = (
        f"spec = importlib.util.spec_from_file_location({PACK_NAME!r}, {PACK_DIR + '/__init__.py'!r},"
        f" submodule_search_locations=[{PACK_DIR!r}])\n"
        "sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        f"import importlib; importlib.import_module({PACK_NAME!r} + '.env_manager').TorchaxEnvManager.instance()"
    )
    loaded = _imports_after(statement)
    assert not loaded & {"jax", "torchax"}


def test_importing_the_pack_like_comfyui_imports_neither_jax_nor_torchax():
    statement = (
        f"spec = importlib.util.spec_from_file_location({PACK_NAME!r}, {PACK_DIR + '/__init__.py'!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert module.NODE_CLASS_MAPPINGS"
    )
    loaded = _imports_after(statement)
    assert not loaded & {"jax", "torchax"}


def test_the_monitor_report_before_any_run_starts_no_jax():
    statement = (
        f"spec = importlib.util.spec_from_file_location({PACK_NAME!r}, {PACK_DIR + '/__init__.py'!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        f"report = importlib.import_module({PACK_NAME!r} + '.server_routes').device_report()\n"
        "assert report == {'started': False, 'platform': None, 'devices': [], 'components': [],"
        " 'compiled_programs': 0}, report"
    )
    assert not _imports_after(statement) & {"jax", "torchax"}

