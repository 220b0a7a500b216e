"""The rule that decides which linears of a Wan transformer are quantized to HiF4 W4A4 and which are kept.

Why this module exists: calibration (which linears get hooks), build (which linears get masks), ``plan``
(what the user is shown) and the runtime must select exactly the same layers. The selection is a rule
over module paths and module types, not a list of names, so it holds for any depth and for Wan2.1/2.2
variants alike:

  * quantized: every ``nn.Linear`` at ``blocks.<i>.<role>`` whose role is in ``BLOCK_LINEAR_ROLES``
    (attention q/k/v/out of ``attn1`` and ``attn2``, the image-context ``add_k_proj``/``add_v_proj`` of
    ``attn2`` when present, the two FFN projections), unless block ``i`` is a retained block;
  * kept high precision, with a reason: every other ``nn.Linear`` (the boundary linears of the time and
    text embedders and ``proj_out``; the image embedder; any linear inside a block whose role is not
    known); plus every non-linear module (norms, the Conv3d patch embedding, embeddings), which the
    runtime never touches.

For Wan2.2-I2V-A14B this gives 400 quantized + 6 kept linears per transformer (tests/test_targets.py).
The rule is spec/stats-v1.md section 2.3.
The transformers can be built on the ``meta`` device from a ``config.json`` alone (``meta_transformers``),
so the rule can be applied without downloading a byte of weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hif4fmt.errors import BaseCheckpointError, RecipeError
from hif4fmt.jsonfile import load_json_file
from hif4fmt.recipe import COMPONENTS, MAX_RETAINED_BLOCKS, RetainedBlock

BLOCK_PATH = re.compile(r"blocks\.(?P<index>0|[1-9][0-9]*)\.(?P<role>.+)")  # blocks.<i>.<role>

# role of a linear inside a transformer block (its path after "blocks.<i>.") -> what it computes
BLOCK_LINEAR_ROLES: dict[str, str] = {
    "attn1.to_q": "self-attention query",
    "attn1.to_k": "self-attention key",
    "attn1.to_v": "self-attention value",
    "attn1.to_out.0": "self-attention output",
    "attn2.to_q": "cross-attention query",
    "attn2.to_k": "cross-attention key (text)",
    "attn2.to_v": "cross-attention value (text)",
    "attn2.to_out.0": "cross-attention output",
    "attn2.add_k_proj": "cross-attention key (image context, Wan2.1 I2V only)",
    "attn2.add_v_proj": "cross-attention value (image context, Wan2.1 I2V only)",
    "ffn.net.0.proj": "feed-forward up projection (before GELU)",
    "ffn.net.2": "feed-forward down projection",
}
IMAGE_EMBEDDER_PREFIX = "condition_embedder.image_embedder."  # CLIP image context projection (Wan2.1 I2V)

# reasons written into ExcludedLayer.reason (spec/stats-v1.md section 7.2)
BOUNDARY_REASON = "boundary linear kept high precision"
IMAGE_EMBEDDER_REASON = "image embedder kept high precision"
UNKNOWN_BLOCK_LINEAR_REASON = "unrecognised linear inside a block kept high precision"
RETAINED_BLOCK_REASON = "retained block {index}"

ASSUMED_BYTES_PER_PARAMETER = 2  # plan without weights: Wan checkpoints store transformer linears in BF16
CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
TRANSFORMER_CLASS = "WanTransformer3DModel"
MAX_CONFIG_BYTES = 1024 * 1024  # a transformer config.json is < 2 KB; refuse anything above 1 MiB


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of a component: where it is, its shape (features), and its block / role if any."""

    component: str
    module: str
    in_features: int
    out_features: int
    bias: bool
    block: int | None  # transformer block index, None outside ``blocks``
    role: str | None  # key of BLOCK_LINEAR_ROLES, None when not a known block linear

    @property
    def parameters(self) -> int:
        """Return the number of weight + bias parameters."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class KeptLayer:
    """A linear kept in high precision and the reason (one of the ``*_REASON`` strings)."""

    layer: LinearLayer
    reason: str


@dataclass(frozen=True)
class ComponentPlan:
    """Which linears of one component are quantized and which are kept, plus its other modules by type."""

    component: str
    num_blocks: int
    quantized: tuple[LinearLayer, ...]
    kept: tuple[KeptLayer, ...]
    other_modules: dict[str, int] = field(default_factory=dict)  # class name -> count (norms, Conv3d, ...)

    def quantized_names(self) -> list[str]:
        return [layer.module for layer in self.quantized]

    def kept_names(self) -> list[str]:
        return [kept.layer.module for kept in self.kept]


def classify_linear(module: str) -> tuple[bool, str | None, int | None, str | None]:
    """Return (quantize, reason_if_kept, block_index, role) for a linear at module path ``module``.

    Retained blocks are not considered here (see ``plan_component``).
    """
    match = BLOCK_PATH.fullmatch(module)
    if match:
        index, role = int(match["index"]), match["role"]
        if role in BLOCK_LINEAR_ROLES:
            return True, None, index, role
        return False, UNKNOWN_BLOCK_LINEAR_REASON, index, None
    if module.startswith(IMAGE_EMBEDDER_PREFIX):
        return False, IMAGE_EMBEDDER_REASON, None, None
    return False, BOUNDARY_REASON, None, None


def check_retained_blocks(retained: Iterable[RetainedBlock], num_blocks: dict[str, int]) -> tuple[RetainedBlock, ...]:
    """Return the retained blocks sorted; ``RecipeError`` if more than 2, unknown component or index too big."""
    blocks = tuple(sorted(set(retained)))
    if len(blocks) > MAX_RETAINED_BLOCKS:
        raise RecipeError(f"{len(blocks)} retained blocks ({', '.join(map(str, blocks))}): at most "
                          f"{MAX_RETAINED_BLOCKS} whole blocks may stay high precision across both experts")
    for block in blocks:
        block.validate()
        if block.component not in num_blocks:
            raise RecipeError(f"retained block {block}: the model has no component {block.component!r} "
                              f"(it has {', '.join(sorted(num_blocks))})")
        if block.index >= num_blocks[block.component]:
            raise RecipeError(f"retained block {block}: {block.component} has {num_blocks[block.component]} "
                              f"blocks (0..{num_blocks[block.component] - 1})")
    return blocks


def plan_component(model: Any, component: str, retained: Iterable[RetainedBlock] = ()) -> ComponentPlan:
    """Return the quantize/keep plan of one transformer (a torch module, meta device is fine).

    Modules are listed in ``named_modules`` order (the model's own order). Retained blocks of other
    components are ignored; call ``check_retained_blocks`` first to validate them.
    """
    from torch import nn

    retained_here = {block.index for block in retained if block.component == component}
    quantized: list[LinearLayer] = []
    kept: list[KeptLayer] = []
    other: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            quantize, reason, block, role = classify_linear(name)
            layer = LinearLayer(component, name, int(module.in_features), int(module.out_features),
                                module.bias is not None, block, role)
            if quantize and block in retained_here:
                kept.append(KeptLayer(layer, RETAINED_BLOCK_REASON.format(index=block)))
            elif quantize:
                quantized.append(layer)
            else:
                kept.append(KeptLayer(layer, reason))
        elif name and not list(module.children()) and (
                "Norm" in type(module).__name__ or any(True for _ in module.parameters(recurse=False))):
            kind = type(module).__name__  # norms, Conv3d patch embedding, ...: never touched
            other[kind] = other.get(kind, 0) + 1
    num_blocks = len(getattr(model, "blocks", ()))
    return ComponentPlan(component, num_blocks, tuple(quantized), tuple(kept), dict(sorted(other.items())))


def plan_model(models: dict[str, Any], retained: Iterable[RetainedBlock] = ()) -> dict[str, ComponentPlan]:
    """Return {component: ComponentPlan} for the transformers ``models``; validates the retained blocks."""
    num_blocks = {name: len(getattr(model, "blocks", ())) for name, model in models.items()}
    blocks = check_retained_blocks(retained, num_blocks)
    return {name: plan_component(model, name, blocks) for name, model in sorted(models.items())}


# --- building the transformers without weights ----------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    """Return a transformer ``config.json`` as a dict; ``BaseCheckpointError`` if unreadable or not Wan."""
    config = load_json_file(path, "the transformer config", MAX_CONFIG_BYTES, BaseCheckpointError)
    if not isinstance(config, dict):
        raise BaseCheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    class_name = config.get("_class_name", TRANSFORMER_CLASS)
    if class_name != TRANSFORMER_CLASS:
        raise BaseCheckpointError(f"{path}: _class_name is {class_name!r}; expected {TRANSFORMER_CLASS!r} "
                                  f"(a Wan transformer config)")
    return config


def component_configs(path: str | Path) -> dict[str, Path]:
    """Return {component: config.json path} for a diffusers folder, a component folder or a config file.

    A lone config file or component folder is named after its folder when that is ``transformer`` or
    ``transformer_2``, else ``transformer``.
    """
    path = Path(path)
    if path.is_file():
        name = path.parent.name if path.parent.name in COMPONENTS else COMPONENTS[0]
        return {name: path}
    if not path.is_dir():
        raise BaseCheckpointError(f"{path}: no such file or folder; pass a diffusers model folder, a "
                                  f"transformer folder or a transformer {CONFIG_NAME}")
    if (path / CONFIG_NAME).is_file() and not (path / MODEL_INDEX_NAME).is_file():
        name = path.name if path.name in COMPONENTS else COMPONENTS[0]
        return {name: path / CONFIG_NAME}
    found = {name: path / name / CONFIG_NAME for name in COMPONENTS if (path / name / CONFIG_NAME).is_file()}
    if not found:
        raise BaseCheckpointError(f"{path}: found neither {CONFIG_NAME} nor "
                                  f"{' / '.join(f'{c}/{CONFIG_NAME}' for c in COMPONENTS)}; pass a diffusers "
                                  f"Wan folder, a transformer folder or a transformer config.json")
    return found


def meta_transformers(path: str | Path) -> dict[str, Any]:
    """Return {component: WanTransformer3DModel on the ``meta`` device} built from the config(s) at ``path``.

    No weights are read or allocated. Raises ``BaseCheckpointError`` for a config diffusers refuses.
    """
    import torch
    from diffusers import WanTransformer3DModel

    models = {}
    for name, config_path in component_configs(path).items():
        config = _read_config(config_path)
        try:
            with torch.device("meta"):
                models[name] = WanTransformer3DModel.from_config(config)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise BaseCheckpointError(f"{config_path}: diffusers cannot build {TRANSFORMER_CLASS} from this "
                                      f"config: {exc}") from None
    return models
