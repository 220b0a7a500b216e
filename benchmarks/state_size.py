"""Benchmark: .hif4 state size at Wan2.2-I2V-A14B shapes vs the BF16 base it is bound to.

Why: the point of a compact state is to ship masks (one value per input channel of each quantized
linear) instead of quantized weights. This builds the real layer set of both A14B experts (40 blocks x
10 linears each, hidden 5120, FFN 13824: 800 quantized layers, 12 boundary linears excluded) with
random positive masks, writes it with each mask dtype, and prints file, header and mask bytes against
the base's BF16 size. Also importable: ``a14b_state(mask_dtype)`` is shared with inspect_speed.py.

    python benchmarks/state_size.py
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hif4fmt.recipe import COMPONENTS, Recipe  # noqa: E402
from hif4fmt.state import (BaseBinding, ExcludedLayer, QuantizedLayer, State, TensorDigest,  # noqa: E402
                           encode_state)

DIM, FFN, BLOCKS = 5120, 13824, 40  # Wan2.2 A14B: hidden size, FFN width, blocks per expert
BLOCK_LINEARS = {  # module suffix -> (out_features, in_features)
    **{f"attn{a}.{p}": (DIM, DIM) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "ffn.net.0.proj": (FFN, DIM),
    "ffn.net.2": (DIM, FFN),
}
BOUNDARY = ("condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
            "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
            "condition_embedder.text_embedder.linear_2", "proj_out")
A14B_EXPERT_PARAMS = 14_288_901_184  # one A14B expert per its config: 40 x 351,394,304 + 233,129,024
BF16_BYTES = 2


CONFIGS = ROOT / "tools" / "configs" / "wan2.2-i2v-a14b"


def a14b_tensor_table() -> dict[str, dict[str, TensorDigest]]:
    """Return base.tensors (format 1.1) of both A14B experts: every tensor name and shape from the real
    config on the meta device, BF16, digest sha256(name) (the size, not the values, matters here)."""
    from hif4fmt.targets import meta_transformers

    tables = {}
    for component, model in meta_transformers(CONFIGS).items():
        tables[component] = {name: TensorDigest("BF16", tuple(tensor.shape),
                                                hashlib.sha256(f"{component}/{name}".encode()).hexdigest())
                             for name, tensor in model.state_dict().items()}
    return tables


def a14b_state(mask_dtype: str = "float32", seed: int = 0, tensors: bool = True) -> State:
    """Return a State with the 800 quantized layers and 12 boundary exclusions of both A14B experts.

    ``tensors``: also record every base tensor (format 1.1 ``base.tensors``, what ``hif4fmt build`` writes).
    """
    rng = np.random.default_rng(seed)
    layers, excluded = [], []
    for component in COMPONENTS:
        for block in range(BLOCKS):
            for suffix, (out_features, in_features) in BLOCK_LINEARS.items():
                module = f"blocks.{block}.{suffix}"
                mask = rng.uniform(0.05, 20.0, in_features).astype(np.float32)
                weight = hashlib.sha256(f"{component}/{module}.weight".encode()).hexdigest()
                layers.append(QuantizedLayer(component, module, in_features, out_features, mask, weight))
        excluded += [ExcludedLayer(component, module, "boundary layer") for module in BOUNDARY]
    base = BaseBinding("hif4fmt-sha256-tensors-v1", hashlib.sha256(b"a14b").hexdigest(),
                       {c: hashlib.sha256(c.encode()).hexdigest() for c in COMPONENTS},
                       len(COMPONENTS) * A14B_EXPERT_PARAMS * BF16_BYTES,
                       {"repo_id": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"},
                       {"name": "wan2.2-i2v-a14b", "pipeline": "WanImageToVideoPipeline",
                        "transformers": list(COMPONENTS)},
                       a14b_tensor_table() if tensors else {})
    calibration = {"statistic": "percentile", "prompts": 64, "seed": 0, "height": 480, "width": 832,
                   "frames": 81, "steps": 40, "guidance": 3.5, "prompt_set_sha256": "0" * 64}
    return State(Recipe(mask_dtype=mask_dtype), calibration, base, tuple(layers), tuple(excluded))


def main() -> None:
    quantized_weight_bytes = None
    print(f"{'mask dtype':10}  {'file bytes':>12}  {'header':>9}  {'masks':>11}  {'vs base (BF16)':>15}  "
          f"{'vs quantized linears (BF16)':>28}")
    for mask_dtype in ("float32", "float16", "bfloat16"):
        state = a14b_state(mask_dtype)
        data = encode_state(state)
        if mask_dtype == "float32":
            data_f32 = data
        with tempfile.TemporaryDirectory(dir="/tmp") as temp:
            (Path(temp) / "s.hif4").write_bytes(data)
        header_bytes = int.from_bytes(data[12:20], "little")
        mask_bytes = sum(l.in_features for l in state.layers) * {"float32": 4}.get(mask_dtype, 2)
        quantized_weight_bytes = sum(l.in_features * l.out_features for l in state.layers) * BF16_BYTES
        print(f"{mask_dtype:10}  {len(data):12d}  {header_bytes:9d}  {mask_bytes:11d}  "
              f"{len(data) / state.base.total_bytes:15.6%}  {len(data) / quantized_weight_bytes:28.6%}")
    without = encode_state(a14b_state("float32", tensors=False))
    table = a14b_tensor_table()
    print(f"base.tensors (format 1.1, every base tensor's dtype, shape, digest: "
          f"{sum(map(len, table.values()))} tensors): {len(data_f32) - len(without)} bytes of header, "
          f"{(len(data_f32) - len(without)) / len(data_f32):.2%} of the float32 state")
    print(f"base: 2 experts x {A14B_EXPERT_PARAMS} params x BF16 = {state.base.total_bytes / 1e9:.2f} GB; "
          f"quantized linears alone {quantized_weight_bytes / 1e9:.2f} GB; 800 layers, 24 excluded")


if __name__ == "__main__":
    main()
