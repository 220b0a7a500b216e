"""Plant activation outliers into a Wan transformer without changing its BF16 function (a synthetic test model).

Why this module exists: random weights give activations without outlier channels, so on the bundled
test models the calibration masks barely matter. Trained DiTs (and LLMs: SmoothQuant, the DiT
quantization literature) show a few *massive input channels* of the linears, 10-100x the others, whose
weights are that much smaller, coming from the AdaLN modulation, the cross-attention norm, the text
embedding and the value path; plus *rare token spikes*. This rewrites a transformer's state dict so
that it has exactly that structure while computing the same function up to BF16 rounding: every
change is a reparametrisation ``upstream channel c x s``, ``downstream input column c / s`` that cancels
in exact arithmetic, with s a power of two (so the scalings of weights and biases are exact in BF16;
only the few values that mix a scale with an offset are rounded once).

Sites (diffusers ``WanTransformer3DModel`` names; a site whose tensors are absent is skipped, so any
Wan layout works: Wan2.1/2.2 T2V/I2V/TI2V):

- ``adaln-msa``: the AdaLN modulation feeding ``attn1.to_q/to_k/to_v``. The modulated input is
  ``norm1(h) * (1 + scale) + shift`` with ``scale = scale_shift_table[1] + time_proj(t)[1]`` (chunk 1
  of 6) and ``shift`` chunk 0. Channel c: the ``time_proj`` rows of both chunks and the shift entry of
  every block's ``scale_shift_table`` x s, the scale entry ``s * e + (s - 1)`` (so ``1 + scale`` becomes
  ``s (1 + scale)``), and the three consumers' column c / s. ``time_proj`` is shared by all blocks, so
  the channels are the same in every block (as massive channels are in trained DiTs).
- ``adaln-ffn``: the same for chunks 3 and 4 (``norm3``) and ``ffn.net.0.proj``.
- ``norm2``: the cross-attention norm's affine weight and bias x s, ``attn2.to_q`` column / s (per block).
- ``text``: the text embedding's last linear (``condition_embedder.text_embedder.linear_2``) output
  channel x s, every block's ``attn2.to_k/to_v`` column / s.
- ``value``: ``attn1.to_v`` (and ``attn2.to_v``, ``attn2.add_v_proj`` where present) output channel
  x s and ``to_out.0`` column / s (attention is linear in v; per block). ``ffn.net.2`` reads a GELU
  output, which is not homogeneous, so it gets no planted channel.
- ``text-spike``: rare token spikes. Wan zero-pads the prompt embedding to ``max_sequence_length``, so
  every padding token has the one text-embedding value ``y_pad = text_embedder(0)``. For a few other
  channels ``y' = s (y - y_pad) + y_pad`` (``linear_2`` rows x s, bias ``s b + (1 - s) y_pad``), and the
  consumers ``attn2.to_k/to_v`` get column / s and bias ``b - W[:, c] (1 - s) / s y_pad``: padding tokens
  keep their ordinary value, the prompt's real tokens spike s x. They are as rare as the prompt is short
  against ``max_sequence_length`` (10 tokens of 512: 2 %); a percentile above that fraction's
  complement sees only the padding level, the max sees the spikes.

Everything is synthetic and seeded; ``plant_outliers`` returns the plan (the channels and factors of
every site) so tests and docs can check what was planted. ``plant_outliers_in_folder`` rewrites the
transformer components of a saved diffusers pipeline folder in place (the same bytes for the same seed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OUTLIER_FACTORS = (16.0, 32.0, 64.0)      # channel scale s: powers of two in the 10-100x range (exact in BF16)
SPIKE_FACTOR = 64.0                       # text-spike scale s around the padding value
CHANNELS_PER_UNIT = 1 / 64                # planted channels per input channel (one per HiF4 unit of 64) ...
MIN_CHANNELS = 2                          # ... and at least this many per site
SPIKE_CHANNELS = 2                        # text-spike channels (disjoint from the ``text`` site's)
MODULATION_CHUNKS = 6                     # shift, scale, gate (attn1), c_shift, c_scale, c_gate (ffn)
SHIFT_MSA, SCALE_MSA, SHIFT_FFN, SCALE_FFN = 0, 1, 3, 4
WAN_TRANSFORMER_CLASS = "WanTransformer3DModel"
TEXT_LINEAR_1 = "condition_embedder.text_embedder.linear_1"
TEXT_LINEAR_2 = "condition_embedder.text_embedder.linear_2"
TIME_PROJ = "condition_embedder.time_proj"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class PlantedSite:
    """One planted site: the consuming linears (module names), their input channels and the scale of each."""

    site: str
    consumers: tuple[str, ...]
    channels: tuple[int, ...]
    factors: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"site": self.site, "consumers": list(self.consumers), "channels": list(self.channels),
                "factors": list(self.factors)}


def _blocks(state_dict) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := _BLOCK.match(key))})


def _pick(rng: np.random.Generator, width: int, count: int | None = None, exclude=()) -> tuple[list[int], list[float]]:
    """Return (sorted distinct channels of ``range(width)`` not in ``exclude``, one factor per channel)."""
    if count is None:
        count = max(MIN_CHANNELS, int(round(width * CHANNELS_PER_UNIT)))
    pool = np.setdiff1d(np.arange(width), np.asarray(list(exclude), dtype=np.int64))
    channels = sorted(int(c) for c in rng.choice(pool, size=min(count, pool.size), replace=False))
    factors = [float(f) for f in rng.choice(OUTLIER_FACTORS, size=len(channels))]
    return channels, factors


def _scale_columns(state, module: str, channels, factors) -> None:
    weight = state[f"{module}.weight"]
    for channel, factor in zip(channels, factors):
        weight[:, channel] /= factor


def _scale_rows(state, module: str, channels, factors) -> None:
    for suffix in ("weight", "bias"):
        tensor = state.get(f"{module}.{suffix}")
        if tensor is not None:
            for channel, factor in zip(channels, factors):
                tensor[channel] *= factor


def plant_outliers(state_dict: dict, seed: int = 0) -> tuple[dict, list[PlantedSite]]:
    """Return (a new state dict with planted outliers, the plan) for a Wan transformer ``state_dict``.

    ``state_dict``: {name: torch tensor} as in ``WanTransformer3DModel.state_dict()`` or its
    safetensors file (any float dtypes; the results keep each tensor's dtype). The input is not changed.
    Arithmetic is in float32 and each changed tensor is rounded once to its dtype.
    """
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    dtypes = {name: tensor.dtype for name, tensor in state_dict.items()}
    state = {name: tensor.detach().to(torch.float32).clone() for name, tensor in state_dict.items()}
    blocks = _blocks(state)
    plan: list[PlantedSite] = []

    def block_modules(role: str) -> list[str]:
        return [f"blocks.{b}.{role}" for b in blocks if f"blocks.{b}.{role}.weight" in state]

    # AdaLN modulation: shared time_proj rows, every block's scale_shift_table, consumers' columns.
    if f"{TIME_PROJ}.weight" in state and blocks and f"blocks.{blocks[0]}.scale_shift_table" in state:
        dim = state[f"blocks.{blocks[0]}.scale_shift_table"].shape[-1]
        for site, (shift, scale), roles in (("adaln-msa", (SHIFT_MSA, SCALE_MSA), ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                                            ("adaln-ffn", (SHIFT_FFN, SCALE_FFN), ("ffn.net.0.proj",))):
            consumers = [m for role in roles for m in block_modules(role)]
            if not consumers:
                continue
            channels, factors = _pick(rng, dim)
            for chunk in (shift, scale):
                _scale_rows(state, TIME_PROJ, [chunk * dim + c for c in channels], factors)
            for b in blocks:
                table = state[f"blocks.{b}.scale_shift_table"].view(-1, MODULATION_CHUNKS, dim)
                for channel, factor in zip(channels, factors):
                    table[:, shift, channel] *= factor
                    table[:, scale, channel] = table[:, scale, channel] * factor + (factor - 1.0)
            for module in consumers:
                _scale_columns(state, module, channels, factors)
            plan.append(PlantedSite(site, tuple(consumers), tuple(channels), tuple(factors)))

    # Cross-attention norm (affine): per block.
    for b in blocks:
        norm, consumer = f"blocks.{b}.norm2", f"blocks.{b}.attn2.to_q"
        if f"{norm}.weight" in state and f"{consumer}.weight" in state:
            channels, factors = _pick(rng, state[f"{norm}.weight"].shape[0])
            _scale_rows(state, norm, channels, factors)
            _scale_columns(state, consumer, channels, factors)
            plan.append(PlantedSite("norm2", (consumer,), tuple(channels), tuple(factors)))

    # Text embedding output channels, read by every block's attn2.to_k / to_v.
    text_consumers = block_modules("attn2.to_k") + block_modules("attn2.to_v")
    text_channels: list[int] = []
    if f"{TEXT_LINEAR_2}.weight" in state and text_consumers:
        width = state[f"{TEXT_LINEAR_2}.weight"].shape[0]
        text_channels, factors = _pick(rng, width)
        _scale_rows(state, TEXT_LINEAR_2, text_channels, factors)
        for module in text_consumers:
            _scale_columns(state, module, text_channels, factors)
        plan.append(PlantedSite("text", tuple(text_consumers), tuple(text_channels), tuple(factors)))

    # Value path: to_v output channel x s, to_out.0 input column / s (per block, per attention).
    for b in blocks:
        for attn in ("attn1", "attn2"):
            upstream = [f"blocks.{b}.{attn}.{p}" for p in ("to_v", "add_v_proj") if f"blocks.{b}.{attn}.{p}.weight" in state]
            consumer = f"blocks.{b}.{attn}.to_out.0"
            if upstream and f"{consumer}.weight" in state:
                channels, factors = _pick(rng, state[f"{upstream[0]}.weight"].shape[0])
                for module in upstream:
                    _scale_rows(state, module, channels, factors)
                _scale_columns(state, consumer, channels, factors)
                plan.append(PlantedSite("value", (consumer,), tuple(channels), tuple(factors)))

    # Rare token spikes: real prompt tokens s x away from the padding value on a few text channels.
    if f"{TEXT_LINEAR_2}.weight" in state and f"{TEXT_LINEAR_1}.bias" in state and text_consumers:
        width = state[f"{TEXT_LINEAR_2}.weight"].shape[0]
        channels, _ = _pick(rng, width, SPIKE_CHANNELS, exclude=text_channels)
        factors = [SPIKE_FACTOR] * len(channels)
        hidden = F.gelu(state_dict[f"{TEXT_LINEAR_1}.bias"].float(), approximate="tanh")  # text_embedder(0), before
        padding = F.linear(hidden, state_dict[f"{TEXT_LINEAR_2}.weight"].float(),
                           state_dict[f"{TEXT_LINEAR_2}.bias"].float())
        for channel, factor in zip(channels, factors):
            state[f"{TEXT_LINEAR_2}.weight"][channel] *= factor
            state[f"{TEXT_LINEAR_2}.bias"][channel] = state[f"{TEXT_LINEAR_2}.bias"][channel] * factor \
                + (1.0 - factor) * padding[channel]
            for module in text_consumers:
                column = state[f"{module}.weight"][:, channel]
                if f"{module}.bias" in state:
                    state[f"{module}.bias"] -= column * ((1.0 - factor) / factor) * padding[channel]
                column /= factor
        plan.append(PlantedSite("text-spike", tuple(text_consumers), tuple(channels), tuple(factors)))

    return {name: tensor.to(dtypes[name]).contiguous() for name, tensor in state.items()}, plan


def transformer_components(base_dir: str | Path) -> list[str]:
    """Return the sorted subfolders of a diffusers pipeline folder whose config is a Wan transformer."""
    base_dir = Path(base_dir)
    found = []
    for config in sorted(base_dir.glob("*/config.json")):
        if json.loads(config.read_text()).get("_class_name") == WAN_TRANSFORMER_CLASS:
            found.append(config.parent.name)
    return found


def plant_outliers_in_folder(base_dir: str | Path, seed: int = 0) -> dict[str, list[PlantedSite]]:
    """Rewrite every Wan transformer of the pipeline folder ``base_dir`` with planted outliers; return the plans.

    Each component (in sorted order, index k) gets ``plant_outliers(..., seed=seed * 16 + k)``, so the two
    experts of Wan2.2 get different channels. Each safetensors file (shards too) is rewritten with the
    same tensor names and metadata. Deterministic: the same folder and seed give the same bytes.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    plans = {}
    for index, component in enumerate(transformer_components(base_dir)):
        files = sorted((Path(base_dir) / component).glob("*.safetensors"))
        tensors, metadata, owner = {}, {}, {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                metadata[path] = handle.metadata()
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
                    owner[name] = path
        planted, plans[component] = plant_outliers(tensors, seed=seed * 16 + index)
        for path in files:
            save_file({name: planted[name] for name in tensors if owner[name] == path}, path, metadata=metadata[path])
    return plans
