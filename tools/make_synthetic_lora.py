"""Write a random LoRA for a (tiny / medium) Wan base in the original-Wan or the diffusers layout; merge one by hand.

Why this tool exists: the runtime's LoRA path (wan_runtime/lora.py, which reads files with diffusers'
own converters) must be tested and measured against LoRAs whose exact update is known, without any
download. This writes one from a seed, with a chosen rank and update size, for every block linear of
an expert (plus two kept boundary linears, ``proj_out`` and the text embedder's first linear), in

    original  (Wan / kohya / ComfyUI / lightx2v): diffusion_model.blocks.N.self_attn.q.lora_down.weight,
              .lora_up.weight and .alpha (block linears: alpha = rank / 2, so the alpha scaling is exercised)
    diffusers (PEFT):                              transformer.blocks.N.attn1.to_q.lora_A.weight, .lora_B.weight

and ``merge_by_hand`` writes a copy of a base with W + scale * delta merged in BF16 (or exactly, rounded
once) in the named experts: the independent reference the tests compare the runtime against. The name table
below is this tool's own (not diffusers'), so the reference does not share code with what it checks.

    python tools/make_synthetic_lora.py BASE_DIR OUT.safetensors [--component transformer] [--rank 8]
                                        [--relative-norm 0.1] [--layout original|diffusers] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # single-file expert, as make_tiny_wan writes it
# diffusers module role in a block -> original Wan name (the Wan2.x repository's module names)
BLOCK_ROLES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
KEPT_LAYERS = {"proj_out": "head.head", "condition_embedder.text_embedder.linear_1": "text_embedding.0"}
LAYOUTS = ("original", "diffusers")


def _targets(weights: dict, block_only: bool) -> dict[str, str]:
    """Return {diffusers module: original-Wan module} of the linears the synthetic LoRA changes."""
    targets = {}
    blocks = sorted({int(name.split(".")[1]) for name in weights if name.startswith("blocks.")})
    for block in blocks:
        for role, original in BLOCK_ROLES.items():
            targets[f"blocks.{block}.{role}"] = f"blocks.{block}.{original}"
    if not block_only:
        targets.update(KEPT_LAYERS)
    return targets


def synthetic_lora_factors(base_dir: str | Path, component: str = "transformer", rank: int = 8,
                           relative_norm: float = 0.1, seed: int = 0, block_only: bool = False) -> dict:
    """Return {diffusers module: (down (r, in) f32, up (out, r) f32)} with ||up @ down||_F = relative_norm * ||W||_F."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(Path(base_dir) / component / WEIGHTS_FILE)
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for module in _targets(weights, block_only):
        weight = weights[f"{module}.weight"].double()
        out_features, in_features = weight.shape
        down = torch.randn(rank, in_features, generator=generator, dtype=torch.float64) / in_features ** 0.5
        up = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
        up *= relative_norm * weight.norm() / (up @ down).norm()
        factors[module] = (down.float(), up.float())
    return factors


def write_synthetic_lora(base_dir: str | Path, out_path: str | Path, component: str = "transformer", rank: int = 8,
                         relative_norm: float = 0.1, layout: str = "original", seed: int = 0,
                         block_only: bool = False) -> Path:
    """Write the LoRA of ``synthetic_lora_factors`` (BF16 factors) in ``layout`` to ``out_path``; return it.

    ``original``: ``diffusion_model.<wan name>.lora_down/lora_up.weight`` and, for block linears,
    ``.alpha`` = rank / 2 (the up factor is stored times 2 so that the update is the same); ``diffusers``: ``transformer.<module>
    .lora_A/lora_B.weight`` (no alpha: scaling 1).
    """
    import torch
    from safetensors.torch import load_file, save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    names = _targets(load_file(Path(base_dir) / component / WEIGHTS_FILE), block_only)
    tensors = {}
    for module, (down, up) in synthetic_lora_factors(base_dir, component, rank, relative_norm, seed,
                                                     block_only).items():
        if layout == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"] = down.to(torch.bfloat16)
            tensors[f"transformer.{module}.lora_B.weight"] = up.to(torch.bfloat16)
        else:
            prefix = f"diffusion_model.{names[module]}"
            tensors[f"{prefix}.lora_down.weight"] = down.to(torch.bfloat16)
            if module.startswith("blocks."):  # diffusers' converter takes .alpha for block linears only
                tensors[f"{prefix}.lora_up.weight"] = (up * 2).to(torch.bfloat16)  # alpha / rank = 1/2 undoes the 2
                tensors[f"{prefix}.alpha"] = torch.tensor(rank / 2, dtype=torch.bfloat16)
            else:
                tensors[f"{prefix}.lora_up.weight"] = up.to(torch.bfloat16)
    out_path = Path(out_path)
    save_file(tensors, out_path)
    return out_path


def lora_update(lora_path: str | Path) -> dict:
    """Return {diffusers module: float64 delta (out, in)} of a file this tool wrote, read with this tool's table."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(lora_path)
    inverse = {original: module for module, original in {**BLOCK_ROLES, **KEPT_LAYERS}.items()}
    updates = {}
    for key, tensor in tensors.items():
        if key.startswith("transformer.") and key.endswith(".lora_A.weight"):
            module = key[len("transformer."):-len(".lora_A.weight")]
            updates[module] = tensors[f"transformer.{module}.lora_B.weight"].double() @ tensor.double()
        elif key.startswith("diffusion_model.") and key.endswith(".lora_down.weight"):
            original = key[len("diffusion_model."):-len(".lora_down.weight")]
            prefix = key[:-len(".lora_down.weight")]
            if original.startswith("blocks."):
                _, block, role = original.split(".", 2)
                module = f"blocks.{block}.{inverse[role]}"
            else:
                module = inverse[original]
            alpha = float(tensors[f"{prefix}.alpha"]) / tensor.shape[0] if f"{prefix}.alpha" in tensors else 1.0
            updates[module] = tensors[f"{prefix}.lora_up.weight"].double() @ tensor.double() * alpha
    return updates


def merged_weight(weight, delta, scale: float, exact: bool = False):
    """Return W + scale * delta in W's dtype: a merge in that dtype (scale * delta rounded to it, then added) or,
    with ``exact``, computed in float64 and rounded once."""
    if exact:
        return (weight.double() + scale * delta).to(weight.dtype)
    return (weight.float() + (scale * delta).to(weight.dtype).float()).to(weight.dtype)


def merge_by_hand(base_dir: str | Path, out_dir: str | Path, loras: dict[str, list[tuple[str | Path, float]]],
                  exact: bool = False) -> Path:
    """Copy ``base_dir`` to ``out_dir`` with each LoRA merged by ``merged_weight`` into the named experts.

    ``loras``: {component: [(lora file written by this tool, scale), ...]}, merged in order. The default
    is a BF16 merge (the update rounded to BF16, then added: what a merge in the model dtype does);
    ``exact`` rounds W + scale * delta once. Returns ``out_dir``.
    """
    from safetensors.torch import load_file, save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    shutil.copytree(base_dir, out_dir)
    for component, items in loras.items():
        path = out_dir / component / WEIGHTS_FILE
        weights = load_file(path)
        for lora_path, scale in items:
            for module, delta in lora_update(lora_path).items():
                weights[f"{module}.weight"] = merged_weight(weights[f"{module}.weight"], delta, scale, exact)
        save_file(weights, path, metadata={"format": "pt"})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--component", default="transformer", choices=("transformer", "transformer_2"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--relative-norm", type=float, default=0.1, help="||delta||_F / ||W||_F per layer")
    parser.add_argument("--layout", choices=LAYOUTS, default="original")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_synthetic_lora(args.base_dir, args.out, args.component, args.rank, args.relative_norm,
                               args.layout, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
