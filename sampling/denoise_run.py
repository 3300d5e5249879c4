"""The denoising loop: one run of compiled ``StepProgram``s over a schedule, decided on the host before
the first step (which expert, which guidance, which MagCache mode per step).

Model-agnostic: the family's conditioning and final touch come from its class; nothing here asks which
family it runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..runtime.compiled import compiled_program, shape_key
from ..runtime.placement import batch_sharding, local_device, replicated, to_host, whole_weight_copies
from ..utils import device_errors
from .step_program import StepKind, StepProgram

logger = logging.getLogger("wan_tpu")

_SMALL_PROGRAMS = {}  # tiny jitted helpers, made on first use (jax specialises them per shape)


def residual_norm_ratio(jax):
    """MagCache's magnitude ratio per batch entry, jitted: the mean over tokens of |r| / (|r_prev| + 1e-8),
    norms over channels in float32, as diffusers' calibration computes it. Only scalars leave the device."""
    if "norm_ratio" not in _SMALL_PROGRAMS:
        jnp = jax.numpy

        def ratio(residual, previous):
            current = jnp.linalg.norm(residual.astype(jnp.float32), axis=-1)
            before = jnp.linalg.norm(previous.astype(jnp.float32), axis=-1)
            return jnp.mean(current / (before + 1e-8), axis=-1)

        _SMALL_PROGRAMS["norm_ratio"] = jax.jit(ratio)
    return _SMALL_PROGRAMS["norm_ratio"]


def middle_frame(jax):
    """A latent's middle frame [C, h, w] of its first video, jitted, so a preview copies only that."""
    if "middle_frame" not in _SMALL_PROGRAMS:
        _SMALL_PROGRAMS["middle_frame"] = jax.jit(lambda latent: latent[0, :, latent.shape[2] // 2])
    return _SMALL_PROGRAMS["middle_frame"]


@dataclass
class Callbacks:
    """What a caller hears during a run (each may be None)."""

    on_step: Callable[[int, int], None] | None = None  # (i, total): i=0 once compiled, then after every step
    on_status: Callable[[str], None] | None = None  # "compiling ...", "copying ..."
    on_preview: Callable[[np.ndarray], None] | None = None  # the x0 prediction's middle frame [C, h, w]

    def status(self, text: str) -> None:
        if self.on_status is not None:
            self.on_status(text)


@dataclass
class DenoiseRun:
    """One run: ``experts`` (transformer components, high-noise first) stepped over ``schedule``.

    Per step, on the host: ``expert_of_step`` (index into ``experts``), ``guidance_of_step`` and
    ``modes`` (MagCache: None, "record" or "reuse"). ``whole_weights``: copy the weights the sequence
    layout would gather every step whole onto every device for this run (one expert only).
    ``calibrate``: record MagCache's magnitude ratio at every step (``calibration`` after ``run``).
    """

    manager: Any
    family: Any
    experts: list
    schedule: Any  # scheduler.Schedule: host arrays ``coefficients`` and ``timesteps``
    expert_of_step: list
    guidance_of_step: list
    modes: list
    layout: str
    cfg: bool
    whole_weights: bool = False
    calibrate: bool = False
    attention_of_step: list | None = None  # per step "dense" or "radial" (step_program.ATTENTION_MODES); None: dense
    dense_blocks: int = 0  # radial steps: the first transformer blocks that stay dense
    calibration: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)

    @property
    def kind_of(self) -> Callable[[tuple], StepKind]:
        """The ``StepKind`` of a (MagCache mode, attention) pair."""
        def kind(program):
            mode, attention = program
            return StepKind(self.cfg, mode, self.layout, attention, self.dense_blocks if attention == "radial" else 0)

        return kind

    @property
    def programs_of_step(self) -> list[tuple]:
        """Per step, the program it runs: (MagCache mode, attention)."""
        attention = self.attention_of_step or ["dense"] * len(self.modes)
        return list(zip(self.modes, attention))

    def run(self, noise: np.ndarray, context, condition, image_embeds,
            callbacks: Callbacks = Callbacks()) -> np.ndarray:
        """The final latents (normalised space, host) from ``noise`` [1, C, T, h, w] and the prompt
        ``context`` (host: Wan's [batch, tokens, dim], or the family's tuple); ``condition`` / ``image_embeds``: the family's image
        conditioning, or None."""
        transformer = self.experts[0]
        mesh = transformer.mesh
        with contextlib.ExitStack() as run_scope:
            jax = self.manager.jax
            sample = jax.device_put(noise, replicated(mesh))
            # The state is donated to each step, so each slot needs a buffer of its own.
            state = (sample, *(jax.numpy.zeros(sample.shape, jax.numpy.float32, device=replicated(mesh))
                               for _ in range(3)))
            pair = batch_sharding(mesh, 2 if self.cfg else 1)
            context = jax.tree_util.tree_map(lambda part: jax.device_put(part, pair), context)
            inputs = self.family.step_conditioning(condition, image_embeds, noise.shape, 2 if self.cfg else 1,
                                                   str(jax.tree_util.tree_leaves(context)[0].dtype))
            step_weights = self._step_weights(run_scope, callbacks)
            programs = self._compile(step_weights[0], state, context, inputs, callbacks)
            state = self._loop(programs, step_weights, state, context, callbacks)
            latents = to_host(state[0])
        return self.family.finish(latents, inputs)

    def _step_weights(self, run_scope, callbacks: Callbacks) -> list:
        """Each expert's weights for the step: as loaded, or (``whole_weights``) with whole copies made for
        this run and deleted when it ends."""
        weights = [expert.weights for expert in self.experts]
        if not self.whole_weights:
            return weights
        transformer = self.experts[0]
        callbacks.status("copying the weights whole onto every device")
        with device_errors("copying the weights whole onto every device",
                           "Use layout='tensor' (its weights stay split, as loaded)."):
            weights[0], copies = whole_weight_copies(self.manager, transformer.weights, transformer.plan.specs,
                                                     transformer.mesh)
        run_scope.callback(lambda: [array.delete() for array in copies])
        return weights

    def _compile(self, weights, state, context, inputs, callbacks: Callbacks) -> dict:
        """Each program this run needs, compiled (or found) before step 1, by MagCache mode."""
        transformer = self.experts[0]
        self.conditioning = None
        programs = {}
        with device_errors("compiling the transformer step",
                           "Lower the resolution or num_frames, or use more devices."):
            for mode in dict.fromkeys(self.programs_of_step):
                kind = self.kind_of(mode)
                if kind not in transformer.step_fns:
                    transformer.step_fns[kind] = StepProgram(self.manager, self.family, transformer, kind)
                program = transformer.step_fns[kind]
                if self.conditioning is None and inputs is not None:
                    self.conditioning = program.place_conditioning(inputs)
                self.residual = program.residual_spec(state[0].shape)
                args = (weights, state, context, self.schedule.coefficients[0], self.schedule.timesteps[0],
                        np.float32(self.guidance_of_step[0])) + program.trailing(self.residual, self.conditioning)
                programs[mode] = (program, compiled_program(
                    transformer.compiled_steps, (kind, shape_key(args[1:]), self.whole_weights), program.jitted,
                    args, callbacks.on_status, program.description, device=mesh_device(transformer.mesh)))
        return programs

    def _loop(self, programs: dict, step_weights: list, state, context, callbacks: Callbacks):
        jax = self.manager.jax
        coefficients, timesteps = self.schedule.coefficients, self.schedule.timesteps
        guidance = np.asarray(self.guidance_of_step, np.float32)  # per step: the two experts may differ
        total = len(self.modes)
        if callbacks.on_step is not None:
            callbacks.on_step(0, total)
        for i, (mode, attention) in enumerate(self.programs_of_step):
            started = time.perf_counter()
            program, compiled = programs[mode, attention]
            # The experts have the same shapes and shardings: one compiled step runs either's weights.
            args = (step_weights[self.expert_of_step[i]], state, context, coefficients[i], timesteps[i], guidance[i])
            with device_errors("the transformer", "Lower the resolution or num_frames, or use more devices."):
                if mode == "record":
                    previous = self.residual if self.calibrate else None  # only a calibration keeps two
                    state, self.residual = compiled(*args, *program.trailing(self.residual, self.conditioning))
                else:
                    state = compiled(*args, *program.trailing(self.residual, self.conditioning))
                state[0].block_until_ready()
                if self.calibrate:  # 1.0 where an expert starts: it has no residual of its own yet
                    same_expert = i > 0 and self.expert_of_step[i] == self.expert_of_step[i - 1]
                    self.calibration.append(float(to_host(residual_norm_ratio(jax)(self.residual, previous))[0])
                                            if same_expert else 1.0)
                    previous = None
            self.step_seconds.append(time.perf_counter() - started)
            if callbacks.on_preview is not None:  # state[2]: the step's x0 prediction (UniPC's m)
                callbacks.on_preview(to_host(middle_frame(jax)(state[2])))
            if callbacks.on_step is not None:
                callbacks.on_step(i + 1, total)
        return state


def mesh_device(mesh):
    """The mesh's first device on this host: what compiled programs are checked against."""
    return local_device(mesh)
