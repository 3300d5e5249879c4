"""The page's TPU monitor: what ``GET /wan_tpu/devices`` answers once the pack has run (before, see
test_compat_mesh_import.py: it answers without starting jax)."""

import os

from conftest import TINY_VIDEO, pack_module


def test_the_monitor_report_after_a_run_lists_devices_and_what_the_pack_holds(tiny_model_dir, manager):
    # From an empty cache: another test file's model (an I2V one's CLIP, say) may still be resident.
    manager.release()
    pipe = pack_module("pipeline").WanTPUPipeline(tiny_model_dir, precision="fp32")
    pipe.generate("a cat", "", num_inference_steps=1, guidance_scale=5.0, seed=0, flow_shift=3.0, **TINY_VIDEO)
    report = pack_module("server_routes").device_report()
    assert report["started"] and report["platform"] == "cpu" and len(report["devices"]) == 8
    assert {device["kind"] for device in report["devices"]} == {"cpu"}
    components = {c["kind"]: c for c in report["components"]}
    assert {"text_encoder", "transformer", "vae"} <= set(components)
    assert {c["model"] for c in components.values()} == {os.path.basename(str(tiny_model_dir))}  # a name, no path
    weights = pipe.transformer().weights
    assert components["transformer"]["bytes"] == sum(a.nbytes for a in weights.values())
    # Per device: each component's shards there (weights split over tp are a share, replicated ones whole).
    held = {device["id"]: device["pack_bytes"] for device in report["devices"]}
    first = manager.jax.devices()[0]
    on_first = sum(shard.data.nbytes for entry in manager.owned_arrays() for shard in entry.addressable_shards
                   if shard.device == first)
    assert held[first.id] == on_first > 0
    assert report["compiled_programs"] == manager.compile_count()
