"""Write a synthetic base checkpoint in diffusers layout: random weights, chosen shapes, dtype and sharding.

Why this tool exists: tests and benchmarks of the fingerprint, ``verify`` and the state format need base
folders with exact control over dtype (BF16 included, which numpy cannot name), shard layout, tensor
order and safetensors metadata, without torch and without downloading anything. The safetensors files
are written byte by byte per the safetensors format (8-byte little-endian header length, JSON header,
data), so BF16 is just raw 16-bit patterns.

    python tools/make_synthetic_base.py OUT_DIR [--blocks 2] [--dim 128] [--ffn 256] [--dtype BF16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WAN_BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
BYTES_PER_ELEMENT = {"BF16": 2, "F16": 2, "F32": 4}


def random_tensor_bytes(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> bytes:
    """Return raw little-endian bytes of a random normal tensor in ``dtype`` (BF16 = float32 high half)."""
    values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * np.float32(0.02)
    if dtype == "BF16":
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    return values.astype({"F16": "<f2", "F32": "<f4"}[dtype]).tobytes()


def wan_like_tensors(rng: np.random.Generator, blocks: int, dim: int, ffn: int, dtype: str
                     ) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Return {name: (dtype, shape, raw bytes)} for a Wan-like transformer with ``blocks`` blocks."""
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for index in range(blocks):
        for linear in WAN_BLOCK_LINEARS:
            out_features, in_features = ((ffn, dim) if linear == "ffn.net.0.proj"
                                         else (dim, ffn) if linear == "ffn.net.2" else (dim, dim))
            name = f"blocks.{index}.{linear}"
            tensors[f"{name}.weight"] = (dtype, (out_features, in_features),
                                         random_tensor_bytes(rng, dtype, (out_features, in_features)))
            tensors[f"{name}.bias"] = (dtype, (out_features,), random_tensor_bytes(rng, dtype, (out_features,)))
        tensors[f"blocks.{index}.norm2.weight"] = ("F32", (dim,), random_tensor_bytes(rng, "F32", (dim,)))
    tensors["proj_out.weight"] = (dtype, (64, dim), random_tensor_bytes(rng, dtype, (64, dim)))
    tensors["proj_out.bias"] = (dtype, (64,), random_tensor_bytes(rng, dtype, (64,)))
    return tensors


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
                      metadata: dict[str, str] | None = None, order: list[str] | None = None) -> None:
    """Write a .safetensors file with tensors in ``order`` (default: sorted) and optional metadata."""
    names = order or sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors pads the header with spaces to 8 bytes
    with open(path, "wb") as handle:
        handle.write(len(header_bytes).to_bytes(8, "little"))
        handle.write(header_bytes)
        for name in names:
            handle.write(tensors[name][2])


def write_component(folder: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], shards: int = 1,
                    metadata: dict[str, str] | None = None, reverse_order: bool = False) -> None:
    """Write one component folder: config.json and weights in ``shards`` files (index when > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    names = sorted(tensors, reverse=reverse_order)
    if shards == 1:
        write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors, metadata, names)
        return
    weight_map = {}
    for shard in range(shards):
        shard_name = f"diffusion_pytorch_model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        shard_names = names[shard::shards]
        write_safetensors(folder / shard_name, {n: tensors[n] for n in shard_names}, metadata, shard_names)
        weight_map.update({n: shard_name for n in shard_names})
    index = {"metadata": {"total_size": sum(len(t[2]) for t in tensors.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_synthetic_base(out_dir: Path, blocks: int = 2, dim: int = 128, ffn: int = 256, dtype: str = "BF16",
                        seed: int = 0, shards: int = 1, components: tuple[str, ...] = ("transformer", "transformer_2")
                        ) -> Path:
    """Write a diffusers-layout folder with model_index.json and one Wan-like folder per component."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_index = {"_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.42.1",
                   "boundary_ratio": 0.9}
    for i, component in enumerate(components):
        rng = np.random.default_rng([seed, i])
        write_component(out_dir / component, wan_like_tensors(rng, blocks, dim, ffn, dtype), shards)
        model_index[component] = ["diffusers", "WanTransformer3DModel"]
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(BYTES_PER_ELEMENT), default="BF16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    make_synthetic_base(args.out_dir, args.blocks, args.dim, args.ffn, args.dtype, args.seed, args.shards)
    print(args.out_dir)


if __name__ == "__main__":
    main()
