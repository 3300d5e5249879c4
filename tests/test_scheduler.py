"""Our UniPC weights reproduce diffusers' UniPCMultistepScheduler step by step."""

import numpy as np
import pytest
from conftest import pack_module

scheduler = pack_module("scheduler")


def _diffusers_scheduler(flow_shift, **overrides):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, **overrides
    )


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 50])
@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
# (bh1 with a final sigma of 0 is NaN in diffusers itself, hence sigma_min there.)
@pytest.mark.parametrize("overrides", [{}, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {"disable_corrector": [1]}, {"solver_order": 1}])
def test_unipc_matches_diffusers(steps, flow_shift, overrides):
    import torch

    reference = _diffusers_scheduler(flow_shift, **overrides)
    reference.set_timesteps(steps)
    ours = scheduler.UniPCFlowSchedule.create(dict(reference.config), steps, flow_shift)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-6)

    rng = np.random.default_rng(steps)
    sample = rng.standard_normal((1, 4, 2, 3)).astype(np.float32)
    reference_sample = torch.from_numpy(sample.copy())
    last = m1 = m2 = np.zeros_like(sample)
    for i in range(steps):
        velocity = rng.standard_normal(sample.shape).astype(np.float32)
        reference_sample = reference.step(
            torch.from_numpy(velocity), reference.timesteps[i], reference_sample, return_dict=False
        )[0]
        sample, last, m = scheduler.unipc_update(ours.coefficients[i], sample, velocity, last, m1, m2)
        m1, m2 = m, m1
    np.testing.assert_allclose(sample, reference_sample.numpy(), atol=5e-6)


def test_flow_shift_is_applied_on_every_call():
    config = dict(_diffusers_scheduler(3.0).config)
    a = scheduler.UniPCFlowSchedule.create(config, 10, 3.0)
    b = scheduler.UniPCFlowSchedule.create(config, 10, 5.0)
    c = scheduler.UniPCFlowSchedule.create(config, 10, 3.0)
    assert not np.allclose(a.sigmas, b.sigmas)
    np.testing.assert_array_equal(a.coefficients, c.coefficients)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_type": "epsilon"}, "prediction_type='epsilon' is not supported"),
        ({"use_flow_sigmas": False}, "use_flow_sigmas=False"),
        ({"solver_order": 3}, "solver_order=3"),
    ],
)
def test_unsupported_scheduler_configs_are_refused(change, message):
    config = dict(_diffusers_scheduler(3.0).config)
    config.update(change)
    with pytest.raises(ValueError, match=message):
        scheduler.UniPCFlowSchedule.create(config, 4, 3.0)


def test_bad_step_count_and_shift():
    config = dict(_diffusers_scheduler(3.0).config)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        scheduler.UniPCFlowSchedule.create(config, 0, 3.0)
    with pytest.raises(ValueError, match="flow_shift=0"):
        scheduler.UniPCFlowSchedule.create(config, 4, 0.0)
