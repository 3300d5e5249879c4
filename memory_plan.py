"""HBM plan before loading: will this Wan model (any family) fit on these chips at this size?

``plan_memory`` estimates, per device, what the pack will hold at its peak:

- the weights of all three components (and Wan 2.2 A14B's second expert), exact: the sharding rules of
  ``sharding.py`` applied to the parameter shapes of the diffusers / transformers modules built on
  torch's meta device (``models.wan.modules``; nothing is allocated), with the dtypes the loaders give;
- the activations of the largest stage (transformer step, VAE decode or text encoding): closed-form
  estimates (``models.wan.activations``) times a safety factor.

The pack caches all three components together (``TorchaxEnvManager``), so the peak is all the weights
plus the largest stage's activations; the stages never run at the same time.

``MemoryPlan.check()`` raises ``HBMPlanError`` (a ValueError) that names the components, the GiB needed
and available per device, and what to change. ``check_compiled_memory`` refuses a compiled program whose
own memory analysis does not fit; ``resolve_layout`` is the one rule for the step's layout.

The model registry is ``models.wan.configs``, the activation formulas ``models.wan.activations``, the chips
``runtime.chips``. Importing this module imports neither torch nor jax (ComfyUI imports every
pack at start-up); they are imported on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

from . import sharding
from .models.wan import configs
from .models.wan.activations import (text_encoder_activation_bytes, transformer_activation_bytes, transformer_tokens,
                                     vae_decode_activation_bytes)
from .models.wan.configs import MODEL_EXPERTS, UMT5_XXL_CONFIG, WAN21_CONFIGS, resolve_model, vae_config_for
from .models.wan.latents import LatentGeometry
from .models.wan.modules import PRECISIONS, abstract_weights
from .runtime import chips, environment

logger = logging.getLogger("wan_tpu")

GiB = 2**30
ENV_HBM_GIB = environment.HBM_GIB
COMPONENTS = ("text_encoder", "transformer", "vae")
# Whole weights: the sequence layout can instead copy the weights it gathers whole onto every device once per
# run (freed when the run ends), so that no step gathers them. Planned where the run's peak with the copies
# stays within this share of HBM: every 1.3B run, 14B on v5p; never 14B on a 32-GiB v6e (22 GiB of copies).
WHOLE_WEIGHTS_HBM_SHARE = 0.8


class HBMPlanError(ValueError):
    """The plan says the model will not fit in the devices' HBM at this size."""


# ------------------------------------------------------------------ weights and HBM
def weights_bytes_per_device(component: str, config: Mapping, mesh_shape, precision: str = "bf16") -> int:
    """Bytes of ``component``'s weights on each device of a ``mesh_shape`` mesh, by ``sharding.RULES``."""
    mesh = sharding.mesh_shape_dict(mesh_shape)
    shapes, itemsizes = abstract_weights(component, config, precision)
    plan = sharding.plan_shardings(shapes, sharding.RULES[component], mesh)
    return plan.bytes_per_device(shapes, itemsizes, mesh)


def hbm_from_device_kind(device_kind: str) -> int | None:
    """Nominal HBM bytes of one device of ``device_kind`` (e.g. "TPU v6 lite"), or None if unknown
    (``runtime.chips``)."""
    return chips.hbm_bytes(device_kind)


def hbm_bytes_per_device(device=None, device_kind: str | None = None, hbm_bytes: int | None = None,
                         environ: Mapping | None = None) -> tuple[int | None, str]:
    """(HBM bytes of one device, where that number came from).

    In order: the ``hbm_bytes`` argument; ``WAN_TPU_HBM_GIB``; the device's
    ``memory_stats()["bytes_limit"]``; the chip table (``runtime.chips``), by ``device_kind`` or the
    device's kind. With neither a device nor a kind, jax's first device is
    asked. (None, "unknown") when nothing says (e.g. a CPU).
    """
    if hbm_bytes is not None:
        if hbm_bytes <= 0:
            raise ValueError(f"hbm_bytes={hbm_bytes}: give the HBM of one device in bytes, e.g. {32 * GiB}")
        return int(hbm_bytes), "given"
    given = environment.read(ENV_HBM_GIB, environ=environ)
    if given:
        try:
            gib = float(given)
        except ValueError:
            gib = -1.0
        if not gib > 0:
            raise ValueError(f"{ENV_HBM_GIB}={given!r}: give the HBM of one device in GiB, e.g. 32")
        return int(gib * GiB), ENV_HBM_GIB
    if device is None and device_kind is None:
        import jax

        device = jax.devices()[0]
    if device is not None:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # backends without memory stats raise or return None
            stats = {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats"
        device_kind = device_kind or getattr(device, "device_kind", None)
    found = hbm_from_device_kind(device_kind)
    if found is None:
        return None, "unknown"
    return found, f"{device_kind} (table)"


# ------------------------------------------------------------------ the plan
def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


_LABELS = {"text_encoder": "text encoder", "transformer": "transformer", "vae": "VAE"}
_STAGES = {"transformer": "transformer step", "vae": "VAE decode", "text_encoder": "text encoding"}


@dataclass
class MemoryPlan:
    """Per-device bytes of a Wan run (any family). All ``*_bytes`` are per device.

    Peak = all three components' weights (the pack keeps them cached together)
    + the activations of the largest stage (they run one at a time).
    """

    model: str
    mesh_shape: tuple[int, int]
    height: int
    width: int
    num_frames: int
    precision: str
    cfg: bool
    text_encoder_weights_bytes: int
    transformer_weights_bytes: int
    vae_weights_bytes: int
    transformer_activation_bytes: int
    vae_activation_bytes: int
    text_encoder_activation_bytes: int
    hbm_bytes: int | None  # per device; None when unknown (then ``fits`` is True and nothing is checked)
    hbm_source: str = "unknown"
    suggestions: list[str] = field(default_factory=list)
    # Wan 2.2 A14B keeps a second (low-noise) transformer expert resident beside the first.
    second_expert_weights_bytes: int = 0
    layout: str = "tensor"  # the denoising step's (sharding.LAYOUTS)
    # The sequence layout's gathered weights held whole for the run (counted in the step's activations).
    whole_weights: bool = False

    @property
    def weights_bytes(self) -> int:
        return (self.text_encoder_weights_bytes + self.transformer_weights_bytes + self.vae_weights_bytes
                + self.second_expert_weights_bytes)

    @property
    def weights_by_component(self) -> dict[str, int]:
        return {c: getattr(self, f"{c}_weights_bytes") for c in COMPONENTS}

    @property
    def activations_by_stage(self) -> dict[str, int]:
        return {c: getattr(self, f"{c}_activation_bytes") for c in COMPONENTS}

    @property
    def peak_stage(self) -> str:
        """The component whose stage has the largest activations."""
        stages = self.activations_by_stage
        return max(stages, key=stages.get)

    @property
    def activation_bytes(self) -> int:
        return max(self.activations_by_stage.values())

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def stage_peak_bytes(self, component: str) -> int:
        """Per-device bytes of ``component``'s stage alone: its weights + its activations.

        What that stage's compiled program holds at its peak (its arguments are
        the component's weights), so this is the figure to test against
        ``memory_analysis()`` (``benchmarks/tpu_compile.py``)."""
        if component not in COMPONENTS:
            raise ValueError(f"component={component!r}: use one of {COMPONENTS}")
        return self.weights_by_component[component] + self.activations_by_stage[component]

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.peak_bytes <= self.hbm_bytes

    def _describe(self) -> str:
        dp, tp = self.mesh_shape
        return (f"Wan {self.model} at {self.width}x{self.height}, {self.num_frames} frames "
                f"({self.precision}, {'CFG' if self.cfg else 'no CFG'}) on mesh dp={dp} x tp={tp}, "
                f"{self.layout} layout{' with whole weights' if self.whole_weights else ''}")

    def summary(self) -> str:
        """One line: per-device weights, activations, peak and HBM, in GiB."""
        weights = ", ".join(f"{_LABELS[c]} {_gib(b)}" for c, b in self.weights_by_component.items())
        if self.second_expert_weights_bytes:
            weights += f", low-noise transformer {_gib(self.second_expert_weights_bytes)}"
        hbm = f"{_gib(self.hbm_bytes)} ({self.hbm_source})" if self.hbm_bytes is not None else "unknown"
        verdict = "unchecked" if self.hbm_bytes is None else ("fits" if self.fits else "does NOT fit")
        return (f"{self._describe()}: per device weights {_gib(self.weights_bytes)} ({weights}) + "
                f"{_STAGES[self.peak_stage]} activations ~{_gib(self.activation_bytes)} = "
                f"~{_gib(self.peak_bytes)} of {hbm}: {verdict}")

    def check(self) -> "MemoryPlan":
        """Raise ``HBMPlanError`` if the plan does not fit; return self otherwise."""
        if self.hbm_bytes is None:
            logger.info("HBM per device unknown: not checked. %s", self.summary())
            return self
        if self.fits:
            logger.info("%s", self.summary())
            return self
        parts = sorted(
            [(f"{_LABELS[c]} weights", b) for c, b in self.weights_by_component.items()]
            + [(f"{_STAGES[self.peak_stage]} activations (estimate)", self.activation_bytes)],
            key=lambda item: -item[1],
        )
        too_big = [name for name, size in parts if size > self.hbm_bytes]
        alone = f" More than one device holds on its own: the {' and the '.join(too_big)}." if too_big else ""
        fixes = self.suggestions or ["use more chips, a lower resolution or fewer frames"]
        raise HBMPlanError(
            f"{self._describe()} needs ~{_gib(self.peak_bytes)} of HBM per device, but each device has "
            f"{_gib(self.hbm_bytes)} ({self.hbm_source}): "
            + ", ".join(f"{name} {_gib(size)}" for name, size in parts)
            + f".{alone} To fit: " + "; or ".join(fixes) + "."
            + (f" (Activations are estimates; {ENV_HBM_GIB} sets the HBM per device the plan assumes.)"
               if self.weights_bytes <= self.hbm_bytes else "")
        )


def compiled_memory(compiled) -> dict | None:
    """Per-device bytes of a compiled program, from its own ``memory_analysis()``:
    {"argument", "output", "temp", "alias", "peak"}; None where the backend reports nothing.

    ``peak`` is the compiler's ``peak_memory_in_bytes`` where it reports one,
    else argument + output + temp - alias."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # backends without the analysis
        return None
    if stats is None:
        return None
    out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")}
    reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    out["peak"] = reported if reported > 0 else out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def check_compiled_memory(compiled, what: str, fix: str, device=None, hbm_bytes: int | None = None,
                          environ: Mapping | None = None) -> dict | None:
    """Refuse (``HBMPlanError``) to run ``compiled`` when its own memory analysis does not fit one device.

    The compiler's figures are facts where the plan's activations are
    estimates, so this runs after compiling and before the first execution.
    The program's arguments (weights, state) are already on the device; what
    it adds is its peak minus its arguments, which must fit in what is free:
    the device's ``bytes_limit - bytes_in_use`` where it reports memory stats,
    else its HBM (``hbm_bytes_per_device``) minus the arguments. Unknown HBM
    (a CPU) is not checked. Returns the program's bytes (``compiled_memory``).
    """
    facts = compiled_memory(compiled)
    if facts is None:
        return None
    limit, source = hbm_bytes_per_device(device, hbm_bytes=hbm_bytes, environ=environ)
    if limit is None:
        return facts
    in_use = None
    if device is not None and hbm_bytes is None:
        try:
            in_use = (device.memory_stats() or {}).get("bytes_in_use")
        except Exception:  # backends without memory stats
            in_use = None
    extra = facts["peak"] - facts["argument"]
    free = limit - (in_use if in_use is not None else facts["argument"])
    if extra > free:
        held = f"{_gib(in_use)} in use" if in_use is not None else f"its arguments {_gib(facts['argument'])}"
        raise HBMPlanError(
            f"{what} needs {_gib(facts['peak'])} per device at its peak by the compiler's count (arguments "
            f"{_gib(facts['argument'])}, temporaries {_gib(facts['temp'])}, outputs {_gib(facts['output'])}), "
            f"{_gib(extra)} more than its arguments, but each device has {_gib(limit)} ({source}) with {held}, "
            f"leaving {_gib(max(free, 0))}. {fix}"
        )
    return facts


def resolve_layout(layout: str | None, config: Mapping, mesh, height: int, width: int, num_frames: int,
                   cfg: bool, device_kind: str | None = None) -> tuple[str, str | None]:
    """(layout, why) of a run's step: ``layout``, or for "auto" (and None) the cost model's choice for this
    model, size, mesh and chip (``sharding.choose_layout``, and its reason; None when not "auto"). The one
    rule the HBM plan, the pipeline (``WanTPUPipeline.step_layout``) and the compile command share."""
    layout = sharding.check_layout(layout)
    if layout != "auto":
        return layout, None
    tokens = transformer_tokens(config, height, width, num_frames)
    mesh = sharding.mesh_shape_dict(mesh)
    return sharding.choose_layout(dict(config), tokens, mesh, 2 if cfg else 1, device_kind)


def _plan(label, config, te_config, vae_config, mesh, height, width, num_frames, precision, cfg,
          hbm, hbm_source, layout="tensor", device_kind=None) -> MemoryPlan:
    layout = resolve_layout(layout, config, mesh, height, width, num_frames, cfg, device_kind)[0]
    return MemoryPlan(
        model=label, mesh_shape=(mesh["dp"], mesh["tp"]), height=height, width=width, num_frames=num_frames,
        precision=precision, cfg=cfg, layout=layout,
        text_encoder_weights_bytes=weights_bytes_per_device("text_encoder", te_config, mesh, precision),
        transformer_weights_bytes=weights_bytes_per_device("transformer", config, mesh, precision),
        vae_weights_bytes=weights_bytes_per_device("vae", vae_config, mesh, "fp32"),
        transformer_activation_bytes=transformer_activation_bytes(
            config, mesh, height, width, num_frames, precision, cfg, layout, device_kind
        ),
        vae_activation_bytes=vae_decode_activation_bytes(vae_config, height, width, num_frames, mesh),
        text_encoder_activation_bytes=text_encoder_activation_bytes(te_config, mesh),
        hbm_bytes=hbm, hbm_source=hbm_source,
    )


# Meshes tried when suggesting more chips: dp (1 or 2) x a power of 2 on tp.
_CANDIDATE_MESHES = sorted(
    ((dp, tp) for dp in (1, 2) for tp in (1, 2, 4, 8, 16, 32)), key=lambda mesh: (mesh[0] * mesh[1], -mesh[0])
)


def _suggestions(plan: MemoryPlan, config, te_config, vae_config, args: dict) -> list[str]:
    """What would make ``plan`` fit, each with the per-device GiB it would need."""
    hbm = plan.hbm_bytes
    mesh = {"dp": plan.mesh_shape[0], "tp": plan.mesh_shape[1]}

    def replan(mesh=mesh, label=plan.model, transformer=config, **changes):
        return _plan(label, transformer, te_config, vae_config, mesh, **dict(args, **changes))

    def smallest_mesh(**changes):
        # The fewest devices that fit; at equal counts dp=2 first (CFG's batch of 2 splits over dp).
        for dp, tp in _CANDIDATE_MESHES:
            if dp * tp > plan.mesh_shape[0] * plan.mesh_shape[1]:
                bigger = replan({"dp": dp, "tp": tp}, **changes)
                if bigger.peak_bytes <= hbm:
                    return dp, tp, bigger
        return None

    # Smaller videos than this one, largest first.
    candidates = ((480, 832, plan.num_frames), (plan.height, plan.width, 33), (480, 832, 33))
    smaller_sizes = [(h, w, f) for h, w, f in candidates if h * w * f < plan.height * plan.width * plan.num_frames]
    out = []
    found = smallest_mesh()
    if found:
        dp, tp, bigger = found
        out.append(f"use more chips: a mesh of {dp * tp} devices (dp={dp} x tp={tp}; "
                   f"{environment.DP}/{environment.TP}) "
                   f"needs ~{_gib(bigger.peak_bytes)} per device")
    else:
        for h, w, f in smaller_sizes:
            if replan(height=h, width=w, num_frames=f).peak_bytes <= hbm:
                break  # a smaller video alone fits: said below
            found = smallest_mesh(height=h, width=w, num_frames=f)
            if found:
                dp, tp, bigger = found
                out.append(f"use more chips and a smaller video: {dp * tp} devices (dp={dp} x tp={tp}) at {w}x{h}, "
                           f"{f} frames needs ~{_gib(bigger.peak_bytes)} per device")
                break
    if plan.precision == "fp32":
        out.append(f"use precision bf16 instead of fp32 (~{_gib(replan(precision='bf16').peak_bytes)} per device)")
    if plan.activation_bytes > 0.2 * plan.peak_bytes:
        # The VAE decodes 4 frames at a time: its activations barely depend on num_frames.
        growth = "height x width" if plan.peak_stage == "vae" else "height x width x frames"
        stage = f"the {_STAGES[plan.peak_stage]} activations, ~{_gib(plan.activation_bytes)} here, grow with {growth}"
        for h, w, f in smaller_sizes:
            smaller = replan(height=h, width=w, num_frames=f)
            if smaller.peak_bytes <= hbm:
                what = "the resolution" if plan.peak_stage == "vae" else "the resolution or num_frames"
                out.append(f"lower {what} ({w}x{h}, {f} frames needs "
                           f"~{_gib(smaller.peak_bytes)}; {stage})")
                break
        else:
            out.append(f"lower the resolution{'' if plan.peak_stage == 'vae' else ' or num_frames'} ({stage})")
    if plan.model == "14B":
        small_model = dict(label="1.3B", transformer=dict(WAN21_CONFIGS["1.3B"]))
        small = replan(**small_model)
        if small.peak_bytes <= hbm:
            out.append(f"use the 1.3B model (~{_gib(small.peak_bytes)} per device on this mesh)")
        elif found := smallest_mesh(**small_model):
            dp, tp, bigger = found
            out.append(f"use the 1.3B model on {dp * tp} devices (dp={dp} x tp={tp}): "
                       f"~{_gib(bigger.peak_bytes)} per device")
    return out


def _plan_whole_weights(plan: MemoryPlan, config: Mapping, mesh: dict, device_kind: str | None,
                        forced: bool = False) -> None:
    """Keep the sequence layout's gathered weights whole for the run where the peak with them stays within
    ``WHOLE_WEIGHTS_HBM_SHARE`` of a known HBM (one expert only: two would double the copies), or ``forced``."""
    whole = transformer_activation_bytes(config, mesh, plan.height, plan.width, plan.num_frames, plan.precision,
                                         plan.cfg, "sequence", device_kind, whole_weights=True)
    gathering = plan.transformer_activation_bytes
    plan.transformer_activation_bytes = whole
    if forced or (plan.hbm_bytes and plan.peak_bytes <= WHOLE_WEIGHTS_HBM_SHARE * plan.hbm_bytes):
        plan.whole_weights = True
    else:
        plan.transformer_activation_bytes = gathering


def plan_memory(model: str | Mapping = "14B", mesh_shape=(2, 4), height: int = 720, width: int = 1280,
                num_frames: int = 81, precision: str = "bf16", cfg: bool = True, *,
                text_encoder_config: Mapping | None = None, vae_config: Mapping | None = None,
                hbm_bytes: int | None = None, device_kind: str | None = None, device=None,
                environ: Mapping | None = None, experts: int | None = None,
                layout: str | None = None, whole_weights: bool | None = None) -> MemoryPlan:
    """The per-device HBM plan of a Wan run (any family), from configs alone (nothing is loaded).

    ``model``: "14B", "1.3B", a known repo id, or a transformer config dict
    (transformer/config.json); ``text_encoder_config``/``vae_config`` default
    to UMT5-XXL and the transformer's VAE (``vae_config_for``). ``mesh_shape``: (dp, tp) or {"dp", "tp"}.
    HBM per device: ``hbm_bytes``, else ``WAN_TPU_HBM_GIB``, else ``device``
    (or jax's first device when no ``device_kind`` is given), else the table
    by ``device_kind``. Call ``.check()`` on the result to refuse early.
    ``experts``: 2 for Wan 2.2 A14B, whose two transformers are both resident (default: 2 for "A14B" and
    "A14B-I2V", else 1). ``layout``: the denoising step's, "tensor", "sequence", or "auto" (or None) for the
    one the pipeline will choose on these devices (``device_kind``, else ``device``'s). ``whole_weights``: in the
    sequence layout, hold the gathered weights whole for the run (True), never (False), or where they fit
    within ``WHOLE_WEIGHTS_HBM_SHARE`` of a known HBM (None, what the pipeline does).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    label, config = resolve_model(model)
    LatentGeometry.from_transformer_config(config).check_video(height, width, num_frames)
    te_config = configs.clean_config(text_encoder_config or UMT5_XXL_CONFIG)
    vae_config = configs.clean_config(vae_config or vae_config_for(config))
    mesh = sharding.mesh_shape_dict(mesh_shape)
    hbm, source = hbm_bytes_per_device(device, device_kind, hbm_bytes, environ)
    kind = device_kind or getattr(device, "device_kind", None)
    args = dict(height=height, width=width, num_frames=num_frames, precision=precision, cfg=bool(cfg),
                hbm=hbm, hbm_source=source, layout=layout, device_kind=kind)
    plan = _plan(label, config, te_config, vae_config, mesh, **args)
    experts = MODEL_EXPERTS.get(label, 1) if experts is None else int(experts)
    plan.second_expert_weights_bytes = plan.transformer_weights_bytes * (experts - 1)
    if plan.layout == "sequence" and experts == 1 and mesh["tp"] > 1 and whole_weights is not False:
        _plan_whole_weights(plan, config, mesh, kind, forced=bool(whole_weights))
    if not plan.fits:
        plan.suggestions = _suggestions(plan, config, te_config, vae_config, args)
    logger.debug("%s", plan.summary())
    return plan
