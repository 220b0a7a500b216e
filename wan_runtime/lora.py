"""Merge LoRA files into a BF16 Wan2.2 expert before it is packed to HiF4 (docs/runtime.md, "LoRAs").

Why this module exists: a .hif4 state is bound to the unmodified base, and a LoRA cannot be fused into
packed HiF4 weights. So the loader verifies the state against the base as always, loads each expert in
BF16, merges the LoRAs into its weights here, and only then packs HiF4((W + delta) / m).

The files are read by diffusers' own Wan LoRA code, not by a key mapper of ours:
``WanImageToVideoPipeline.lora_state_dict`` converts the original-Wan / kohya / ComfyUI / lightx2v layouts
(``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` + ``.alpha``) and musubi's (``lora_unet_...``)
to the diffusers/PEFT layout (``transformer.blocks.N.attn1.to_q.lora_A.weight``);
``WanImageToVideoPipeline.load_lora_into_transformer`` injects the adapter into the expert (PEFT), and the
expert's ``fuse_lora`` / ``unload_lora`` merge it in place and drop the adapter layers: that is what
``pipe.load_lora_weights(..., adapter_name=...)`` (``load_into_transformer_2=True`` for the low-noise
expert), ``pipe.fuse_lora`` and ``pipe.unload_lora_weights`` do on a pipeline, called on one expert
before the pipeline exists. LoRAs are merged one at a time, each with its own scale; PEFT's merge adds
the update to the weight in place (``W += scale * B @ A * alpha / r``), so no second copy of the expert
is made. Layers the state keeps in BF16 (boundary linears) get their update too.

What is checked here, before an expert is changed (each failure is one typed error naming the file and
the key; ``hif4fmt.errors``): the file is a safetensors file with finite tensors; every key names a
LoRA tensor of a layer of that expert, with a fitting shape; the LoRA is for this model size; the scale
is finite. Keys diffusers' converter would drop without applying (norm ``.diff`` keys, other ``.diff``
full-weight keys) are refused when they are not all zero, rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hif4fmt.base import parse_safetensors_header
from hif4fmt.errors import (BaseCheckpointError, LoraFormatError, LoraKeyError, LoraModelMismatchError,
                            LoraScaleError, LoraShapeError)

EXPERT_PREFIX = "transformer"  # diffusers' converted keys start "transformer." for either expert
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")  # PEFT layout
BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
ADAPTER_NAME = "hif4_merge"  # the adapter lives only between load_lora_into_transformer and unload_lora
DEFAULT_SCALE = 1.0


class PartialLoraWarning(UserWarning):
    """A LoRA that touches only some of an expert's quantized linears (it is applied; the warning says how many)."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: its safetensors file and its scale (a finite float)."""

    path: Path
    scale: float = DEFAULT_SCALE


@dataclass(frozen=True)
class AppliedLora:
    """Provenance of one merged LoRA: file, sha256 of its bytes, scale, expert, and how many layers it changed."""

    path: str
    sha256: str
    scale: float
    expert: str
    layers: int

    def as_dict(self) -> dict:
        """Return the JSON form (keys path, sha256, scale, expert, layers)."""
        return {"path": self.path, "sha256": self.sha256, "scale": self.scale, "expert": self.expert,
                "layers": self.layers}


def _finite_scale(value, where: str) -> float:
    """Return ``value`` as a finite float; ``LoraScaleError`` naming ``where`` otherwise."""
    if isinstance(value, bool):
        raise LoraScaleError(f"{where}: scale {value!r} is not a number; pass a finite number such as 0.8")
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise LoraScaleError(f"{where}: scale {value!r} is not a number; pass a finite number such as 0.8") from None
    if not math.isfinite(scale):
        raise LoraScaleError(f"{where}: scale {value!r} is not finite; pass a finite number such as 0.8")
    return scale


def parse_lora_argument(text: str) -> LoraSpec:
    """Return the LoraSpec of a CLI value ``PATH[:SCALE]`` (scale 1.0 when absent).

    The scale is what follows the last ``:``, if that is not part of an existing file's name; a
    non-numeric or non-finite scale raises ``LoraScaleError`` naming the argument.
    """
    path_text, sep, scale_text = text.rpartition(":")
    if not sep or os.path.exists(text) or not path_text or "/" in scale_text:
        return LoraSpec(Path(text), DEFAULT_SCALE)
    return LoraSpec(Path(path_text), _finite_scale(scale_text, f"LoRA {text}"))


def lora_specs(items) -> list[LoraSpec]:
    """Return LoraSpecs for ``items``: each a path, a ``(path, scale)`` pair or a LoraSpec (None: empty list)."""
    specs = []
    for item in items or ():
        if isinstance(item, LoraSpec):
            specs.append(LoraSpec(Path(item.path), _finite_scale(item.scale, f"LoRA {item.path}")))
        elif isinstance(item, (str, os.PathLike)):
            specs.append(LoraSpec(Path(item), DEFAULT_SCALE))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            specs.append(LoraSpec(Path(item[0]), _finite_scale(item[1], f"LoRA {item[0]}")))
        else:
            raise LoraScaleError(f"LoRA {item!r}: expected a path or a (path, scale) pair")
    return specs


def check_lora_files(specs: list[LoraSpec]) -> None:
    """Raise ``LoraFormatError`` for the first file of ``specs`` that is missing or has no valid safetensors header.

    Header only (cheap): called before any expert is loaded, so a mistyped second-expert path fails at
    once instead of after the first expert was packed. ``read_lora_file`` checks the contents later.
    """
    for spec in specs:
        if not spec.path.is_file():
            raise LoraFormatError(f"LoRA {spec.path}: no such file; pass a .safetensors LoRA file")
        try:
            parse_safetensors_header(spec.path)
        except (BaseCheckpointError, OSError) as exc:
            raise LoraFormatError(f"LoRA {spec.path}: not a safetensors file ({exc}); LoRAs are read from "
                                  ".safetensors only (no pickle)") from None


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """Return (tensors by key as stored, diffusers LoRA adapter metadata or None, sha256 hex) of one file.

    The file is read once; the hash is of those bytes. Raises ``LoraFormatError`` naming the file for a
    missing file, a file that is not safetensors, and the key for a NaN/inf tensor.
    """
    import safetensors
    import safetensors.torch
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    if not path.is_file():
        raise LoraFormatError(f"LoRA {path}: no such file; pass a .safetensors LoRA file")
    try:
        _, file_metadata = parse_safetensors_header(path)
        data = path.read_bytes()
        tensors = safetensors.torch.load(data)
    except (BaseCheckpointError, safetensors.SafetensorError, OSError, ValueError) as exc:
        raise LoraFormatError(f"LoRA {path}: not a safetensors file ({exc}); LoRAs are read from "
                              ".safetensors only (no pickle)") from None
    digest = hashlib.sha256(data).hexdigest()
    del data
    if not tensors:
        raise LoraKeyError(f"LoRA {path}: holds no tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            if key.endswith(".alpha") and tensor.numel() == 1:  # an integer alpha is a valid LoRA scale
                continue
            raise LoraFormatError(f"LoRA {path}: key {key}: a {tensor.dtype} tensor, expected floating point; "
                                  "the file is not a LoRA or was saved wrongly")
        if not bool(torch.isfinite(tensor).all()):
            raise LoraFormatError(f"LoRA {path}: key {key}: NaN or inf values; the file is corrupt or was saved "
                                  "wrongly")
    adapter_metadata = None
    raw = (file_metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        try:
            adapter_metadata = json.loads(raw)
        except ValueError as exc:
            raise LoraFormatError(f"LoRA {path}: metadata {LORA_ADAPTER_METADATA_KEY} is not JSON: {exc}") from None
    return tensors, adapter_metadata, digest


def _unapplied_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Return the stored keys diffusers' Wan converter drops without applying (see its "diff" handling)."""
    if not any(key.startswith("diffusion_model.") for key in tensors):
        return []
    dropped = []
    for key in tensors:
        inner = key[len("diffusion_model."):]
        if inner.endswith((".diff", ".diff_b")) and "norm" in inner:
            dropped.append(key)
        elif inner.endswith(".diff") and inner != "head.head.diff":
            dropped.append(key)
    return dropped


def convert_lora(path: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the LoRA in diffusers/PEFT layout (keys ``transformer.<module>.lora_A.weight`` ...), via diffusers.

    Raises ``LoraKeyError`` naming the file and the keys diffusers cannot convert, or a nonzero key it
    would drop unapplied.
    """
    from diffusers import WanImageToVideoPipeline

    for key in _unapplied_keys(tensors):
        if bool(tensors[key].any()):
            raise LoraKeyError(f"LoRA {path}: key {key}: a nonzero full-weight/norm difference that diffusers' Wan "
                               "LoRA loader does not apply; refusing rather than rendering without it")
    try:
        converted = WanImageToVideoPipeline.lora_state_dict(dict(tensors))
        converted = WanImageToVideoPipeline._maybe_expand_t2v_lora_for_i2v(model, converted)
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise LoraKeyError(f"LoRA {path}: diffusers' Wan LoRA converter cannot read its keys ({detail}); "
                           "expected the diffusers/PEFT layout or the original Wan / kohya / ComfyUI layout") from None
    return converted


def check_lora_fits(path: Path, converted: dict[str, torch.Tensor], model: nn.Module, component: str) -> set[str]:
    """Return the module names of ``model`` the converted LoRA changes; raise if any key does not fit.

    ``LoraModelMismatchError`` when the LoRA names blocks the expert lacks or no layer's shape fits
    (a LoRA for another model size); ``LoraKeyError`` for a key naming no layer; ``LoraShapeError`` for
    one layer whose shape does not fit.
    """
    modules = dict(model.named_modules())
    block_count = len(getattr(model, "blocks", ()))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        match = LORA_KEY.match(key.removeprefix(f"{EXPERT_PREFIX}.")) if key.startswith(f"{EXPERT_PREFIX}.") else None
        if match is None:
            raise LoraKeyError(f"LoRA {path}: key {key}: not a LoRA tensor of {component} (expected "
                               f"{EXPERT_PREFIX}.<module>.lora_A.weight / lora_B.weight / lora_B.bias after conversion)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    beyond = sorted({int(m.group(1)) for name in parts if (m := BLOCK_INDEX.match(name))} - set(range(block_count)))
    if beyond:
        raise LoraModelMismatchError(f"LoRA {path}: names block {beyond[0]} (and {len(beyond) - 1} more) but "
                                     f"{component} has {block_count} blocks; the LoRA is for another model size")
    fitting, mismatches = set(), []
    for name, tensors in sorted(parts.items()):
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            found = "absent" if module is None else f"a {type(module).__name__}"
            raise LoraKeyError(f"LoRA {path}: key {EXPERT_PREFIX}.{name}.lora_A.weight: names no linear layer of "
                               f"{component} ({name} is {found}); the LoRA is for another model")
        down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if down is None or up is None:
            missing = "lora_A.weight" if down is None else "lora_B.weight"
            raise LoraKeyError(f"LoRA {path}: layer {name}: has no {missing}; a LoRA layer needs both factors")
        expected_down, expected_up = (down.shape[0], module.in_features), (module.out_features, down.shape[0])
        bias = tensors.get("lora_B.bias")
        if (down.ndim != 2 or tuple(down.shape) != expected_down or tuple(up.shape) != expected_up
                or (bias is not None and tuple(bias.shape) != (module.out_features,))):
            mismatches.append(f"key {EXPERT_PREFIX}.{name}.lora_A.weight / lora_B.weight: shapes "
                              f"{tuple(down.shape)} / {tuple(up.shape)}, layer {component}.{name} needs "
                              f"(r, {module.in_features}) / ({module.out_features}, r)")
        else:
            fitting.add(name)
    if mismatches and not fitting:
        raise LoraModelMismatchError(f"LoRA {path}: no layer's shape fits {component}: {mismatches[0]}; the LoRA "
                                     "is for another model size")
    if mismatches:
        raise LoraShapeError(f"LoRA {path}: {mismatches[0]} ({len(mismatches)} layers do not fit)")
    return fitting


def _merge_one_(model: nn.Module, converted: dict[str, torch.Tensor], metadata: dict | None, scale: float) -> None:
    """Inject the converted LoRA as a PEFT adapter (diffusers), fuse it with ``scale`` in place, drop the adapter."""
    from diffusers import WanImageToVideoPipeline

    WanImageToVideoPipeline.load_lora_into_transformer(converted, transformer=model, adapter_name=ADAPTER_NAME,
                                                       metadata=metadata, low_cpu_mem_usage=True)
    try:
        model.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    finally:
        model.unload_lora()


def merge_loras_(model: nn.Module, component: str, specs: list[LoraSpec],
                 quantized_names: set[str] | None = None) -> list[AppliedLora]:
    """Merge each LoRA of ``specs`` into the BF16 expert ``model`` in place, in order; return their provenance.

    Every file is read and checked before the first is merged, so a bad one leaves ``model`` unchanged.
    ``quantized_names`` (the state's layers of this expert) is what a partial match is counted against:
    a LoRA touching only some of them is merged with a ``PartialLoraWarning`` saying how many.
    Raises the ``LoraError`` subclasses of ``check_lora_fits`` / ``read_lora_file``, and ``LoraShapeError``
    when a merged weight overflows to inf.
    """
    prepared = []
    for spec in specs:
        tensors, metadata, digest = read_lora_file(spec.path)
        converted = convert_lora(spec.path, tensors, model)
        del tensors
        touched = check_lora_fits(spec.path, converted, model, component)
        prepared.append((spec, converted, metadata, digest, touched))
    applied = []
    for spec, converted, metadata, digest, touched in prepared:
        _merge_one_(model, converted, metadata, spec.scale)
        for name in sorted(touched):
            if not bool(torch.isfinite(model.get_submodule(name).weight).all()):
                raise LoraShapeError(f"LoRA {spec.path}: layer {component}.{name}: W + {spec.scale} * delta is "
                                     "not finite in the model dtype; the scale or the LoRA is far too large")
        reference = quantized_names if quantized_names else {name for name, module in model.named_modules()
                                                             if isinstance(module, nn.Linear) and name.startswith("blocks.")}
        covered = len(reference & touched)
        if covered < len(reference):
            warnings.warn(f"LoRA {spec.path}: touched {len(touched)} layers of {component}, {covered} of its "
                          f"{len(reference)} {'quantized' if quantized_names else 'block linear'} layers",
                          PartialLoraWarning, stacklevel=2)
        applied.append(AppliedLora(str(spec.path), digest, spec.scale, component, len(touched)))
    return applied
