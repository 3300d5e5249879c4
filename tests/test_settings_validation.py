"""With a 'Wan TPU Sampler Settings' node connected, ComfyUI's check before the run does not refuse the
Sampler's or Full Pipeline's own widgets that the settings replace (they are not used).

ComfyUI calls VALIDATE_INPUTS with a linked input as None and leaves an unconnected one out; the real
server's behaviour is checked in test_comfyui_server.py (test_a_linked_settings_node_runs_...).
"""

import pytest
from conftest import pack_module

nodes = pack_module("nodes")

# Widgets the settings replace, each refused on its own when no settings node is connected.
REPLACED_AND_WRONG = [dict(sampler="unipc", timesteps="999,500"), dict(sampler="euler", timesteps="999,500,250"),
                      dict(precision="fp64"), dict(dp=-1), dict(sampler="ddim")]


@pytest.mark.parametrize("node", ["Wan21TPUSampler", "Wan21TPUPipeline"])
@pytest.mark.parametrize("widgets", REPLACED_AND_WRONG)
def test_replaced_widgets_are_checked_only_without_a_settings_node(node, widgets):
    validate = nodes.NODE_CLASS_MAPPINGS[node].VALIDATE_INPUTS
    common = dict(height=256, width=256, num_frames=17, num_inference_steps=2)
    assert isinstance(validate(**common, **widgets), str)  # not connected: refused, as before
    assert validate(**common, **widgets, settings=None) is True  # connected (ComfyUI passes the link as None)


@pytest.mark.parametrize("node", ["Wan21TPUSampler", "Wan21TPUPipeline"])
def test_a_settings_node_does_not_hide_the_widgets_it_does_not_replace(node):
    validate = nodes.NODE_CLASS_MAPPINGS[node].VALIDATE_INPUTS
    assert "height=250" in validate(height=250, width=256, num_frames=17, settings=None)
    assert "model_id is empty" in validate(model_id=" ", settings=None)
