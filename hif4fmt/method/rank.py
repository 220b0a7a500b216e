"""Rank whole transformer blocks by how much keeping each one in BF16 lowers the W4A4 transformer error.

Why this module exists: the rules let a state keep at most 2 whole blocks in high precision (across
both experts); the paper spends none of that budget. ``hif4fmt rank`` and ``build --retain-block auto``
spend it where it buys the most, measured end to end rather than guessed from layer errors:

1. Capture. The base pipeline runs the calibration protocol recorded in the statistics file (its
   resolution, frames, steps, guidance, seeds; ``hif4fmt.calibration.runner``) on the first
   ``RankSettings.num_prompts`` calibration prompts, and every call of each expert's transformer has
   its inputs captured (both guidance branches, every step). ``RankSettings.calls`` of them per expert,
   evenly spaced over the captured calls, are used.
2. Error model. Every quantized linear is replaced by its fake-quantized W4A4 form
   ``HiF4((x * m) R) @ HiF4((W / m) R)^T + b`` with the masks (and rotations) ``build`` would write for
   the same recipe, ``--search`` included (``hif4fmt.build.layer_masks``); a block "kept in BF16"
   switches its linears back to the base ``nn.Linear``. HiF4 is ``hif4fmt.hifloat4.fake_quantize``.
3. Error. Over the used calls c of both experts,
   ``E = sqrt(sum_c w_c ||T_q(in_c) - T(in_c)||^2 / sum_c w_c ||T(in_c)||^2)`` (Frobenius norms of the
   transformer outputs, float32). ``E_0``: every block quantized (blocks retained explicitly stay BF16);
   a block's ``gain`` is ``E_0 - E`` with that one block in BF16. A block only changes its own expert's
   calls, so each gain costs one pass over that expert's calls.
4. Weights (``RankSettings.weight``). ``output`` (default): ``w_c = 1``, every used call counts the same.
   ``step``: ``w_c = (sigma_i - sigma_{i+1})^2 * n / k`` for a call at scheduler step i of an expert with
   n captured and k used calls. Why: the sampler moves the latent by ``(sigma_{i+1} - sigma_i) * v``, so
   an output error ``dv`` puts ``|sigma_i - sigma_{i+1}| * dv`` into the latent; and ``n / k`` makes an
   expert's few used calls stand for all of its calls. With Wan2.2's boundary (0.9 for I2V) and its flow
   shift, the high-noise expert moves sigma only from 1 to about 0.9, so its errors weigh less than the
   low-noise expert's, which renders what the decoded video shows. Guidance is not weighted (both
   branches count alike).

Cost: per expert (2 + blocks) x ``calls`` transformer forward passes (reference, all quantized, one per
block) plus one pipeline run per prompt for the capture; A14B with the defaults (1 prompt, 4 calls):
2 x 42 x 4 = 336 transformer passes at the calibration resolution. The fake-quantized weights are held
beside the base weights (2x the transformer memory).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hif4fmt.errors import CalibrationError, RecipeError
from hif4fmt.recipe import MAX_RETAINED_BLOCKS, Recipe, RetainedBlock

DEFAULT_RANK_PROMPTS = 1  # first calibration prompt(s) whose transformer calls are captured
DEFAULT_RANK_CALLS = 4    # captured calls used per expert, evenly spaced (both guidance branches count)
AUTO = "auto"             # --retain-block auto
RANK_WEIGHTS = ("output", "step")  # --rank-weight: each call counts the same / by its sampler step (docstring 4)
DEFAULT_RANK_WEIGHT = "output"
TIMESTEP_TOLERANCE = 1e-3  # a call's timestep must be this close to one of the scheduler's timesteps


@dataclass(frozen=True)
class RankSettings:
    """How ``rank`` samples the calibration inputs: the prompts file (None: the file named in the statistics,
    looked up beside the statistics file), how many of its first prompts, calls per expert, device, and
    how the calls are weighted in the error (``RANK_WEIGHTS``; module docstring, step 4)."""

    prompts: Path | None = None
    num_prompts: int = DEFAULT_RANK_PROMPTS
    calls: int = DEFAULT_RANK_CALLS
    device: str = "auto"
    weight: str = DEFAULT_RANK_WEIGHT

    def validate(self, count: int) -> None:
        """Raise ``CalibrationError`` for counts outside [1, calibration prompts] / [1, ...]."""
        if type(self.num_prompts) is not int or not 1 <= self.num_prompts <= count:
            raise CalibrationError(f"--rank-prompts {self.num_prompts!r}: expected an integer in [1, {count}] "
                                   f"(the statistics were calibrated on {count} prompts)")
        if type(self.calls) is not int or self.calls < 1:
            raise CalibrationError(f"--rank-calls {self.calls!r}: expected an integer >= 1")
        if self.weight not in RANK_WEIGHTS:
            raise CalibrationError(f"--rank-weight {self.weight!r}: expected one of {', '.join(RANK_WEIGHTS)}")


def check_auto_budget(explicit: tuple[RetainedBlock, ...]) -> None:
    """Raise ``RecipeError`` when explicit retained blocks leave no room for ``--retain-block auto``."""
    if len(explicit) >= MAX_RETAINED_BLOCKS:
        raise RecipeError(f"--retain-block auto with {len(explicit)} explicit blocks "
                          f"({', '.join(map(str, explicit))}): at most {MAX_RETAINED_BLOCKS} blocks may stay high "
                          f"precision in all, so auto has nothing to choose; drop auto or an explicit block")


def resolve_prompts(stats_path: Path, header: Any, settings: RankSettings) -> tuple[str, ...]:
    """Return the first ``settings.num_prompts`` calibration prompts, checked against the statistics.

    The statistics record the prompt file's name (no folder) and the SHA-256 of the prompts used
    (spec/stats-v1.md 5.2.1); without ``settings.prompts`` the file of that name beside the statistics
    file is read. ``CalibrationError`` when it is missing or its first prompts are not those calibrated on.
    """
    from hif4fmt.calibration.prompts import load_prompts

    recorded = header.prompts
    count = int(recorded["count"])
    settings.validate(count)
    path = Path(settings.prompts) if settings.prompts is not None else Path(stats_path).parent / recorded["source"]
    if not path.is_file():
        raise CalibrationError(f"{path}: prompts file not found; the statistics {stats_path} were calibrated on "
                               f"{recorded['source']!r}; pass it with --prompts")
    prompts = load_prompts(path, count)
    if prompts.sha256 != recorded["sha256"]:
        raise CalibrationError(f"{path}: its first {count} prompts have SHA-256 {prompts.sha256}, but {stats_path} "
                               f"was calibrated on prompts with {recorded['sha256']}; pass the prompts file "
                               f"calibrate used with --prompts")
    return prompts.prompts[:settings.num_prompts]


def _capture_calls(pipe: Any, prompts: tuple[str, ...], protocol: Any, components: list[str],
                   progress: bool) -> tuple[dict[str, list[dict[str, Any]]], tuple[Any, Any] | None]:
    """Return (per component the keyword inputs of every transformer call, tensors cloned to the CPU;
    the scheduler's float64 (timesteps, sigmas) of the run, None when it has no ``sigmas``)."""
    import torch
    from tqdm.auto import tqdm

    from hif4fmt.calibration.runner import blank_image

    captured: dict[str, list[dict[str, Any]]] = {name: [] for name in components}

    def hook_for(name: str):
        def capture(module: Any, args: tuple, kwargs: dict) -> None:
            if args:
                raise CalibrationError(f"{name}: the pipeline called the transformer with positional inputs; "
                                       f"this diffusers version is not supported by rank")
            captured[name].append({key: value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
                                   for key, value in kwargs.items()})
        return capture

    handles = [getattr(pipe, name).register_forward_pre_hook(hook_for(name), with_kwargs=True) for name in components]
    image = blank_image(protocol)
    try:
        for index in tqdm(range(len(prompts)), desc="rank: capture", unit="prompt", disable=not progress):
            generator = torch.Generator("cpu").manual_seed(protocol.seed + index)  # spec 2.2 seed rule
            with torch.no_grad():
                pipe(image=image, prompt=prompts[index], negative_prompt=protocol.negative_prompt,
                     height=protocol.height, width=protocol.width, num_frames=protocol.frames,
                     num_inference_steps=protocol.steps, guidance_scale=protocol.guidance,
                     guidance_scale_2=protocol.guidance_2 if pipe.config.boundary_ratio is not None else None,
                     generator=generator, output_type="latent", max_sequence_length=protocol.max_sequence_length)
    finally:
        for handle in handles:
            handle.remove()
    schedule = None  # the protocol fixes the steps, so every prompt ran this same schedule
    if getattr(pipe.scheduler, "sigmas", None) is not None and getattr(pipe.scheduler, "timesteps", None) is not None:
        schedule = (torch.as_tensor(pipe.scheduler.timesteps).double().cpu().numpy(),
                    torch.as_tensor(pipe.scheduler.sigmas).double().cpu().numpy())
    return captured, schedule


def call_timestep(inputs: dict[str, Any]) -> float:
    """Return the timestep of one captured transformer call (the largest where it is given per token)."""
    import torch

    timestep = inputs.get("timestep")
    if not torch.is_tensor(timestep) or timestep.numel() == 0:
        raise CalibrationError("--rank-weight step: a transformer call carried no timestep tensor; "
                               "use --rank-weight output")
    return float(timestep.double().max())


def step_weights(timesteps: list[float], schedule: tuple[Any, Any] | None, captured: int) -> list[float]:
    """Return ``(sigma_i - sigma_{i+1})^2 * captured / len(timesteps)`` for each used call (module docstring 4).

    ``timesteps``: the used calls' timesteps; ``schedule``: the scheduler's (timesteps (S,), sigmas (S + 1,))
    of the run; ``captured``: how many calls of this expert were captured. ``CalibrationError`` when the
    scheduler has no sigmas, its sigmas are not a flow-matching schedule in [0, 1], or a call's timestep
    is not one of the schedule's (where two steps share a timestep, the first is taken).
    """
    import numpy as np

    if schedule is None:
        raise CalibrationError("--rank-weight step needs a scheduler with sigmas (the flow-matching schedulers "
                               "Wan ships with); use --rank-weight output")
    steps, sigmas = (np.asarray(values, dtype=np.float64) for values in schedule)
    if steps.ndim != 1 or sigmas.ndim != 1 or sigmas.size < steps.size + 1 or steps.size == 0:
        raise CalibrationError(f"--rank-weight step: the scheduler gives {steps.size} timesteps and {sigmas.size} "
                               f"sigmas; expected one sigma more than timesteps; use --rank-weight output")
    if float(np.max(sigmas)) > 1.0 + TIMESTEP_TOLERANCE or float(np.min(sigmas)) < 0.0:
        raise CalibrationError(f"--rank-weight step: the scheduler's sigmas span {float(np.min(sigmas)):g} to "
                               f"{float(np.max(sigmas)):g}, not a flow-matching schedule in [0, 1]; "
                               f"use --rank-weight output")
    weights = []
    for timestep in timesteps:
        index = int(np.argmin(np.abs(steps - timestep)))
        if abs(steps[index] - timestep) > TIMESTEP_TOLERANCE * max(1.0, abs(timestep)):
            raise CalibrationError(f"--rank-weight step: a call at timestep {timestep:g} is not in the scheduler's "
                                   f"schedule; use --rank-weight output")
        weights.append(float(sigmas[index] - sigmas[index + 1]) ** 2 * captured / len(timesteps))
    return weights


def spaced(items: list[Any], count: int) -> list[Any]:
    """Return ``count`` items evenly spaced over ``items`` (first and last included), or all of them."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _fake_quant_module(linear: Any, mask: Any, rotation: str | None, encoder: str) -> Any:
    """Return an ``nn.Module`` computing ``HiF4((x * m) R) @ HiF4((W / m) R)^T + b`` in the input's dtype,
    or the base ``linear`` itself while its ``enabled`` attribute is False."""
    import numpy as np
    import torch

    from hif4fmt.hifloat4 import fake_quantize
    from hif4fmt.method.search import rotate_units

    class FakeQuantized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = linear
            self.enabled = True
            weight = linear.weight.detach()
            m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).to(weight.device)
            scaled = weight.to(torch.float32) / m
            if rotation is not None:
                scaled = rotate_units(scaled)
            self.register_buffer("weight_q", fake_quantize(scaled, encoder).to(weight.dtype), persistent=False)
            self.register_buffer("mask", m, persistent=False)
            self.rotated = rotation is not None

        def forward(self, x: Any) -> Any:
            if not self.enabled:
                return self.base(x)
            scaled = x.to(torch.float32) * self.mask
            if self.rotated:
                scaled = rotate_units(scaled)
            xq = fake_quantize(scaled, encoder).to(x.dtype)
            return torch.nn.functional.linear(xq, self.weight_q, self.base.bias)

    return FakeQuantized()


def _install(model: Any, choices: list[Any], encoder: str) -> dict[int, list[Any]]:
    """Replace each chosen linear of ``model`` by its fake-quantized stand-in; return them per block index."""
    by_block: dict[int, list[Any]] = {}
    for choice in choices:
        parent_name, _, attr = choice.layer.module.rpartition(".")
        parent = model.get_submodule(parent_name)
        stand_in = _fake_quant_module(getattr(parent, attr), choice.mask, choice.rotation, encoder)
        setattr(parent, attr, stand_in)
        by_block.setdefault(choice.layer.block, []).append(stand_in)
    return by_block


def _squared_errors(model: Any, calls: list[dict[str, Any]], references: list[Any], device: Any,
                    weights: list[float]) -> float:
    """Return sum over calls of w ||T_q(in) - T(in)||_F^2 (float64 of the float32 difference)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for inputs, reference, weight in zip(calls, references, weights):
            output = _forward(model, inputs, device)
            total += weight * float(torch.linalg.vector_norm((output - reference).double()) ** 2)
    return total


def _forward(model: Any, inputs: dict[str, Any], device: Any) -> Any:
    """Return the float32 transformer output for one captured call."""
    import torch

    moved = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
    output = model(**moved)
    output = output[0] if isinstance(output, (tuple, list)) else output.sample
    return output.to(torch.float32)


def _set_enabled(stand_ins: list[Any], enabled: bool) -> None:
    for stand_in in stand_ins:
        stand_in.enabled = enabled


def rank_blocks(base_path: str | Path, header: Any, prompts: tuple[str, ...], plans: dict[str, Any],
                choices: list[Any], recipe: Recipe, settings: RankSettings, progress: bool = False) -> dict[str, Any]:
    """Return the ranking (spec/stats-v1.md 8.4): every block of every expert with its ``gain``, best first.

    ``choices`` are ``build``'s per-layer masks (``hif4fmt.build.LayerChoice``) for the ``plans``; blocks
    the recipe already retains are not ranked and stay BF16 throughout. Raises ``CalibrationError`` when
    the pipeline cannot be loaded or an expert never ran under the protocol.
    """
    import torch

    from hif4fmt.calibration.runner import load_pipeline, resolve_device

    started = time.monotonic()
    device = torch.device(resolve_device(settings.device))
    protocol = header.protocol
    pipe = load_pipeline(Path(base_path), protocol.dtype, device, "none", show_progress=progress)
    components = [name for name in plans if getattr(pipe, name, None) is not None]
    captured, schedule = _capture_calls(pipe, prompts, protocol, components, progress)
    explicit = {(block.component, block.index) for block in recipe.retained_blocks}
    per_component: dict[str, dict[str, Any]] = {}
    block_errors: dict[tuple[str, int], float] = {}
    for component in components:
        calls = spaced(captured[component], settings.calls)
        if not calls:
            raise CalibrationError(f"{component} never ran in {len(prompts)} prompt(s) x {protocol.steps} steps "
                                   f"of the calibration protocol; nothing to rank it on")
        weights = ([1.0] * len(calls) if settings.weight == "output" else
                   step_weights([call_timestep(inputs) for inputs in calls], schedule, len(captured[component])))
        model = getattr(pipe, component)
        stand_ins = _install(model, [c for c in choices if c.component == component], recipe.encoder)
        everything = [s for block in stand_ins.values() for s in block]
        with torch.no_grad():
            _set_enabled(everything, False)
            references = [_forward(model, inputs, device) for inputs in calls]
            _set_enabled(everything, True)
        reference_sq = math.fsum(w * float(torch.linalg.vector_norm(r.double()) ** 2)
                                 for r, w in zip(references, weights))
        base_sq = _squared_errors(model, calls, references, device, weights)
        per_component[component] = {"calls": len(calls), "captured_calls": len(captured[component]),
                                    "reference_sq": reference_sq, "quantized_sq": base_sq, "weights": weights}
        for index in range(plans[component].num_blocks):
            if (component, index) in explicit or index not in stand_ins:
                continue
            _set_enabled(stand_ins[index], False)
            block_errors[(component, index)] = _squared_errors(model, calls, references, device, weights)
            _set_enabled(stand_ins[index], True)
        per_component[component]["_stand_ins"] = stand_ins
        per_component[component]["_calls"] = (calls, references, weights)
    total_reference = math.fsum(c["reference_sq"] for c in per_component.values())
    total_quantized = math.fsum(c["quantized_sq"] for c in per_component.values())

    def error_of(replaced: dict[str, float]) -> float | None:
        squared = math.fsum(replaced.get(name, c["quantized_sq"]) for name, c in per_component.items())
        return math.sqrt(squared / total_reference) if total_reference > 0 else None

    baseline = error_of({})
    blocks = []
    for (component, index), squared in block_errors.items():
        error = error_of({component: squared})
        gain = None if baseline is None or error is None else baseline - error
        blocks.append({"block": f"{component}:{index}", "component": component, "index": index, "error": error,
                       "gain": gain, "relative_gain": gain / baseline if gain is not None and baseline else None})
    blocks.sort(key=lambda b: (-(b["gain"] if b["gain"] is not None else -math.inf), b["component"], b["index"]))
    result = {"error": {"all_quantized": baseline, "quantized_sq": total_quantized, "reference_sq": total_reference},
              "components": {name: {key: value for key, value in c.items() if not key.startswith("_")}
                             for name, c in per_component.items()},
              "prompts": len(prompts), "calls_per_expert": settings.calls, "weight": settings.weight,
              "retained_explicitly": [str(block) for block in recipe.retained_blocks],
              "blocks": blocks, "encoder": recipe.encoder, "device": device.type}

    def combined(chosen: list[tuple[str, int]]) -> float | None:
        """Return E with every block of ``chosen`` in BF16 at once (one more pass where two share an expert)."""
        replaced: dict[str, float] = {}
        for component in {c for c, _ in chosen}:
            indices = [i for c, i in chosen if c == component]
            if len(indices) == 1:
                replaced[component] = block_errors[(component, indices[0])]
                continue
            stand_ins = per_component[component]["_stand_ins"]
            calls, references, weights = per_component[component]["_calls"]
            model = getattr(pipe, component)
            for index in indices:
                _set_enabled(stand_ins[index], False)
            replaced[component] = _squared_errors(model, calls, references, device, weights)
            for index in indices:
                _set_enabled(stand_ins[index], True)
        return error_of(replaced)

    result["_combined"] = combined
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def choose_auto_blocks(ranking: dict[str, Any], recipe: Recipe) -> tuple[Recipe, dict[str, Any]]:
    """Return (the recipe with the best blocks added, the ``retain_auto`` summary).

    Adds the highest-gain blocks with a positive gain until ``MAX_RETAINED_BLOCKS`` are retained in all;
    the summary gives each chosen block's own gain and the error with all of them in BF16 together.
    """
    from dataclasses import replace

    room = MAX_RETAINED_BLOCKS - len(recipe.retained_blocks)
    picked = [b for b in ranking["blocks"] if b["gain"] is not None and b["gain"] > 0][:max(0, room)]
    combined = ranking["_combined"]([(b["component"], b["index"]) for b in picked]) if picked else \
        ranking["error"]["all_quantized"]
    blocks = tuple(recipe.retained_blocks) + tuple(RetainedBlock(b["component"], b["index"]) for b in picked)
    chosen_recipe = replace(recipe, retained_blocks=blocks)
    baseline = ranking["error"]["all_quantized"]
    summary = {"chosen": [{"block": b["block"], "gain": b["gain"], "relative_gain": b["relative_gain"],
                           "error": b["error"]} for b in picked],
               "explicit": [str(block) for block in recipe.retained_blocks],
               "error": {"all_quantized": baseline, "with_retained": combined,
                         "gain": None if baseline is None or combined is None else baseline - combined},
               "ranking": public_ranking(ranking)}
    return chosen_recipe, summary


def public_ranking(ranking: dict[str, Any]) -> dict[str, Any]:
    """Return the ranking without its private entries (JSON-able)."""
    return {key: value for key, value in ranking.items() if not key.startswith("_")}
