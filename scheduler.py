"""UniPC multistep for flow matching, as per-step coefficients.

diffusers' ``UniPCMultistepScheduler`` (flow_prediction, use_flow_sigmas,
predict_x0) keeps Python state between steps. For a fixed sigma schedule each
of its steps is a linear combination of the current sample, the previous
corrected sample and the last three data predictions, so the host computes
the weights once per run (``UniPCFlowSchedule``) and the device applies them
(``unipc_update``) inside the compiled denoising step: no Python state, no
host round trip, and nothing recompiles when ``num_inference_steps`` or
``flow_shift`` change.

Works on numpy or jax.numpy arrays; imports neither torch nor jax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Index of each weight in a row of ``UniPCFlowSchedule.coefficients``.
# sigma: the step's sigma (x0 = x - sigma * v). c_*: corrector weights for the
# sample x, the previous corrected sample, and the data predictions m_i,
# m_{i-1}, m_{i-2}. p_*: predictor weights for the corrected sample, m_i, m_{i-1}.
COEFFICIENT_NAMES = ("sigma", "c_x", "c_last", "c_m", "c_m1", "c_m2", "p_x", "p_m", "p_m1")
_I = {name: i for i, name in enumerate(COEFFICIENT_NAMES)}

# The scheduler configurations this implementation reproduces.
_REQUIRED = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "predict_x0": True,
    "thresholding": False,
    "use_dynamic_shifting": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "solver_p": None,
}


def _check_config(config: dict) -> None:
    for key, wanted in _REQUIRED.items():
        if config.get(key, wanted) != wanted:
            raise ValueError(
                f"scheduler {key}={config.get(key)!r} is not supported: Wan 2.1 T2V uses "
                f"UniPCMultistepScheduler with {key}={wanted!r}; use the model's own scheduler_config.json"
            )
    if config.get("solver_type", "bh2") not in ("bh1", "bh2"):
        raise ValueError(f"scheduler solver_type={config.get('solver_type')!r}: use 'bh1' or 'bh2'")
    if config.get("solver_order", 2) not in (1, 2):
        raise ValueError(f"scheduler solver_order={config.get('solver_order')!r}: use 1 or 2 (Wan uses 2)")
    if config.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(f"scheduler final_sigmas_type={config.get('final_sigmas_type')!r}: use 'zero' or 'sigma_min'")
    if config.get("shift_terminal"):
        raise ValueError(f"scheduler shift_terminal={config.get('shift_terminal')!r} is not supported")


@dataclass(frozen=True)
class UniPCFlowSchedule:
    """Timesteps and UniPC weights for one run. ``coefficients`` is [steps, 9] float32."""

    timesteps: np.ndarray  # [steps] float32, what the transformer is conditioned on
    sigmas: np.ndarray  # [steps + 1] float32
    coefficients: np.ndarray  # [steps, len(COEFFICIENT_NAMES)] float32

    @classmethod
    def create(cls, config: dict, num_inference_steps: int, flow_shift: float) -> "UniPCFlowSchedule":
        """Follow ``UniPCMultistepScheduler.set_timesteps``/``step`` for ``config`` (a scheduler_config dict)."""
        _check_config(config)
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: use at least 1 step")
        if not flow_shift > 0:
            raise ValueError(f"flow_shift={flow_shift}: use a positive value (5.0 for 720P, 3.0 for 480P)")
        train_steps = config.get("num_train_timesteps", 1000)
        sigmas = np.linspace(1, 1 / train_steps, steps + 1)[:-1]
        sigmas = flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6  # as diffusers: keeps log(sigma) finite in the first update
        timesteps = (sigmas * train_steps).astype(np.int64).astype(np.float32)
        last = 0.0 if config.get("final_sigmas_type", "zero") == "zero" else sigmas[-1]
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        coefficients = _coefficients(
            sigmas.astype(np.float64),
            solver_order=config.get("solver_order", 2),
            bh2=config.get("solver_type", "bh2") == "bh2",
            lower_order_final=config.get("lower_order_final", True),
            disable_corrector=set(config.get("disable_corrector", []) or []),
        )
        return cls(timesteps=timesteps, sigmas=sigmas, coefficients=coefficients.astype(np.float32))


def _coefficients(sigmas, *, solver_order, bh2, lower_order_final, disable_corrector) -> np.ndarray:
    steps = len(sigmas) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        lambdas = np.log(1 - sigmas) - np.log(sigmas)  # +inf at a final sigma of 0

    def phi(i_from, i_to):
        """(alpha_t, h_phi_1, B_h) for a step from sigmas[i_from] to sigmas[i_to]."""
        h = lambdas[i_to] - lambdas[i_from]
        hh = -h
        h_phi_1 = np.expm1(hh)
        return 1 - sigmas[i_to], h, hh, h_phi_1, (h_phi_1 if bh2 else hh)

    rows = np.zeros((steps, len(COEFFICIENT_NAMES)))
    previous_order = 0
    for i in range(steps):
        row = rows[i]
        row[_I["sigma"]] = sigmas[i]
        # Corrector (UniC) of the sample the last predictor made; order = that predictor's order.
        if i > 0 and (i - 1) not in disable_corrector:
            alpha_t, h, hh, h_phi_1, b_h = phi(i - 1, i)
            row[_I["c_last"]] = sigmas[i] / sigmas[i - 1]
            if previous_order == 1:
                rho_d1, rho_t = 0.0, 0.5
                rk = 1.0
            else:
                rk = (lambdas[i - 2] - lambdas[i - 1]) / h
                h_phi_k = h_phi_1 / hh - 1
                b1 = h_phi_k / b_h
                b2 = (h_phi_k / hh - 0.5) * 2 / b_h
                rho_d1, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
            row[_I["c_m"]] = -alpha_t * b_h * rho_t
            row[_I["c_m2"]] = -alpha_t * b_h * rho_d1 / rk
            row[_I["c_m1"]] = -alpha_t * h_phi_1 + alpha_t * b_h * (rho_d1 / rk + rho_t)
        else:
            row[_I["c_x"]] = 1.0
        # Predictor (UniP) from the corrected sample to sigmas[i + 1].
        order = min(solver_order, steps - i) if lower_order_final else solver_order
        order = min(order, i + 1)  # warm-up: no older predictions yet
        alpha_t, h, hh, h_phi_1, b_h = phi(i, i + 1)
        row[_I["p_x"]] = sigmas[i + 1] / sigmas[i]
        row[_I["p_m"]] = -alpha_t * h_phi_1
        if order == 2:
            rk = (lambdas[i - 1] - lambdas[i]) / h
            row[_I["p_m"]] += alpha_t * b_h * 0.5 / rk
            row[_I["p_m1"]] = -alpha_t * b_h * 0.5 / rk
        previous_order = order
    return rows


def unipc_update(coefficients, sample, velocity, last_sample, m1, m2):
    """One UniPC step on device: returns (next_sample, corrected_sample, m).

    ``coefficients`` is one row of ``UniPCFlowSchedule.coefficients``;
    ``velocity`` the (guided) flow prediction at ``sample``; ``last_sample``,
    ``m1`` and ``m2`` the state the previous step returned (zeros at step 0).
    The caller keeps (next_sample, corrected_sample, m, m1) for the next step.
    """
    c = {name: coefficients[i] for name, i in _I.items()}
    m = sample - c["sigma"] * velocity
    corrected = c["c_x"] * sample + c["c_last"] * last_sample + c["c_m"] * m + c["c_m1"] * m1 + c["c_m2"] * m2
    next_sample = c["p_x"] * corrected + c["p_m"] * m + c["p_m1"] * m1
    return next_sample, corrected, m


# ------------------------------------------------------------------ flow-matching Euler
def flow_match_euler_schedule(num_inference_steps: int, shift: float, timesteps=None,
                              num_train_timesteps: int = 1000) -> UniPCFlowSchedule:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` as UniPC-form coefficients.

    An Euler step ``x + (sigma_next - sigma) * v`` is the UniPC row with no
    corrector (c_x = 1) and predictor weights p_x = sigma_next / sigma,
    p_m = 1 - p_x (with m = x - sigma * v), so it runs in the same compiled
    denoising step as UniPC: choosing Euler compiles nothing new.

    ``timesteps`` (optional, e.g. [1000, 750, 500, 250], as step-distilled Wan
    LoRAs use): the transformer is conditioned on them as given and the sigmas
    are ``shift``-ed from timesteps / num_train_timesteps, as diffusers does.
    """
    if not shift > 0:
        raise ValueError(f"shift={shift}: use a positive flow shift (5.0 for 720P, 3.0 for 480P)")
    train = float(num_train_timesteps)
    if timesteps is not None and len(timesteps):
        given = np.asarray([float(t) for t in timesteps], np.float32)
        if num_inference_steps not in (None, len(given)):
            raise ValueError(
                f"timesteps has {len(given)} values but num_inference_steps={num_inference_steps}: "
                f"give as many timesteps as steps, or leave timesteps empty"
            )
        if np.any(given <= 0) or np.any(given > train) or np.any(np.diff(given) >= 0):
            raise ValueError(
                f"timesteps={given.tolist()}: give decreasing values in (0, {num_train_timesteps}], "
                f"e.g. 1000,750,500,250"
            )
        sigmas = given / np.float32(train)
    else:
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: use at least 1 step")
        given = None
        # The scheduler's own sigma range is already shifted once (diffusers' __init__); set_timesteps
        # spaces timesteps over it and shifts again. Reproduced as diffusers does it, in float32.
        base = np.linspace(1, train, int(train), dtype=np.float32)[::-1] / np.float32(train)
        base = np.float32(shift) * base / (1 + (np.float32(shift) - 1) * base)
        sigmas = np.linspace(base[0] * train, base[-1] * train, steps).astype(np.float32) / np.float32(train)
    sigmas = (np.float32(shift) * sigmas / (1 + (np.float32(shift) - 1) * sigmas)).astype(np.float32)
    return _euler_schedule(sigmas, given if given is not None else (sigmas * np.float32(train)).astype(np.float32))


def flow_match_sigmas_schedule(num_inference_steps: int, shift: float,
                               num_train_timesteps: int = 1000) -> UniPCFlowSchedule:
    """HunyuanVideo 1.5's schedule as UniPC-form Euler coefficients: its diffusers pipeline gives
    ``FlowMatchEulerDiscreteScheduler(shift=shift)`` the sigmas ``linspace(1, 0, steps + 1)[:-1]``, which
    the scheduler shifts once (in float32) and conditions the transformer on sigma x num_train_timesteps."""
    steps = int(num_inference_steps)
    if steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps}: use at least 1 step")
    if not shift > 0:
        raise ValueError(f"shift={shift}: use a positive flow shift (HunyuanVideo 1.5 uses 7.0 at 720P)")
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    sigmas = (np.float32(shift) * sigmas / (1 + (np.float32(shift) - 1) * sigmas)).astype(np.float32)
    return _euler_schedule(sigmas, (sigmas * np.float32(num_train_timesteps)).astype(np.float32))


def _euler_schedule(sigmas: np.ndarray, timesteps_out: np.ndarray) -> UniPCFlowSchedule:
    """Euler steps from each of the shifted ``sigmas`` to the next (and from the last to 0)."""
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    rows = np.zeros((len(timesteps_out), len(COEFFICIENT_NAMES)), np.float64)
    s = sigmas.astype(np.float64)
    rows[:, _I["sigma"]] = s[:-1]
    rows[:, _I["c_x"]] = 1.0
    rows[:, _I["p_x"]] = s[1:] / s[:-1]
    rows[:, _I["p_m"]] = 1.0 - s[1:] / s[:-1]
    return UniPCFlowSchedule(timesteps=timesteps_out.astype(np.float32), sigmas=sigmas,
                             coefficients=rows.astype(np.float32))


SAMPLERS = ("unipc", "euler")


def make_schedule(sampler: str, scheduler_config: dict, num_inference_steps: int, flow_shift: float,
                  timesteps=None) -> UniPCFlowSchedule:
    """The per-step weights for ``sampler``: 'unipc' (the model's own scheduler, Wan's default)
    or 'euler' (flow-matching Euler, for step-distilled models)."""
    if sampler == "unipc":
        if timesteps is not None and len(timesteps):
            raise ValueError("explicit timesteps need sampler='euler': UniPC spaces its own timesteps")
        return UniPCFlowSchedule.create(scheduler_config, num_inference_steps, flow_shift)
    if sampler == "euler":
        return flow_match_euler_schedule(num_inference_steps, flow_shift, timesteps,
                                         scheduler_config.get("num_train_timesteps", 1000))
    raise ValueError(f"sampler={sampler!r}: use one of {', '.join(SAMPLERS)}")


def parse_timesteps(text) -> list[float] | None:
    """'1000, 750, 500, 250' -> [1000.0, 750.0, 500.0, 250.0]; '' or None -> None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, str):
        try:
            return [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"timesteps={text!r}: give numbers separated by commas, e.g. 1000,750,500,250") from None
    return [float(t) for t in text]
