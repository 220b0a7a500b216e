"""``hif4fmt codec``: quantize a seeded random tensor with HiF4 and print its error and size.

Why this module exists: a one-command check that the codec is installed, bit-exact with the golden
vectors and behaves as documented (``--check-vectors``), and a quick look at HiF4 error on a chosen
distribution. Imports torch, unlike the state commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hif4fmt.cli.output import emit, table

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "hifloat4-v1.json"


def _check_vectors(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise click.BadParameter(f"{path}: no such vectors file (it ships in the source tree, spec/vectors/)",
                                 param_hint="--vectors")

    from hif4fmt.hifloat4 import dequantize, quantize

    document = json.loads(path.read_text())
    failures = []
    for case in document["cases"]:
        bits = torch.tensor([int(w, 16) for w in case["input_bf16"]], dtype=torch.int32) << 16
        x = bits.view(torch.float32).to(torch.bfloat16).view(1, -1)
        for encoder, expected in case["expected"].items():
            q = quantize(x, encoder)
            decoded = [f"{int(b) & 0xFFFF:04x}" for b in dequantize(q).view(-1).view(torch.int16)]
            if (q.codes.numpy().tobytes().hex(), q.meta.numpy().tobytes().hex(), decoded) != (
                    expected["elements"], expected["meta"], expected["dequantized_bf16"]):
                failures.append(f"{case['name']}/{encoder}")
    return {"vectors": str(path), "cases": len(document["cases"]), "failures": failures}


@click.command("codec")
@click.option("--rows", default=1024, show_default=True, type=click.IntRange(min=1), help="rows of the random tensor")
@click.option("--cols", default=4096, show_default=True, type=click.IntRange(min=1), help="columns (quantized axis)")
@click.option("--dist", type=click.Choice(["gaussian", "student-t3", "uniform"]), default="gaussian", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--check-vectors", is_flag=True, help="also check the codec against spec/vectors/hifloat4-v1.json")
@click.option("--vectors", type=click.Path(path_type=Path), default=VECTORS, show_default=True,
              help="golden vectors file for --check-vectors")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def codec_cmd(ctx: click.Context, rows: int, cols: int, dist: str, seed: int, check_vectors: bool,
              vectors: Path, as_json: bool) -> None:
    """Quantize a random tensor with both HiF4 encoders and print the error table."""
    import torch

    from hif4fmt.codec import kernel
    from hif4fmt.hifloat4 import HIF4, _quantize_path, fake_quantize, quantize

    g = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        x = torch.randn(rows, cols, generator=g)
    elif dist == "uniform":
        x = torch.rand(rows, cols, generator=g) * 2 - 1
    else:
        x = torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, cols))
    x = x.to(torch.bfloat16).float()
    power = (x**2).mean().item()
    result: dict = {"shape": [rows, cols], "distribution": dist, "seed": seed, "encoders": {}}
    for encoder in ("toolkit", "ascend"):
        y = fake_quantize(x, encoder)
        mse = ((y - x) ** 2).mean().item()
        q = quantize(x, encoder)
        result["encoders"][encoder] = {
            "mse": mse,
            "relative_mse": mse / power,
            "sqnr_db": 10 * torch.log10(torch.tensor(power / mse)).item(),
            "packed_bytes": q.nbytes,
            "bits_per_value": q.nbytes * 8 / x.numel(),
        }
    result["bf16_bytes"] = x.numel() * 2
    result["unit"] = HIF4.unit
    result["implementation"] = {"toolkit_quantize_path": _quantize_path("toolkit", x.device),
                                "kernel_in_use": kernel.enabled(), "kernel": kernel.status()}
    if check_vectors:
        result["vector_check"] = _check_vectors(vectors)

    def render(r: dict) -> str:
        rows_ = [[name, f"{e['mse']:.4e}", f"{e['relative_mse']:.4e}", f"{e['sqnr_db']:.2f}",
                  e["packed_bytes"], f"{e['bits_per_value']:.2f}"] for name, e in r["encoders"].items()]
        text = (f"HiF4 on a {rows} x {cols} {dist} tensor (seed {seed}); BF16 size {r['bf16_bytes']} bytes\n"
                + table(rows_, ["encoder", "MSE", "rel MSE", "SQNR dB", "packed bytes", "bits/value"])
                + f"\ncodec kernel: {r['implementation']['kernel']}")
        if "vector_check" in r:
            v = r["vector_check"]
            text += (f"\ngolden vectors: {v['cases']} cases x 2 encoders, "
                     + ("all bit-exact" if not v["failures"] else f"FAILED: {', '.join(v['failures'])}"))
        return text

    emit(result, as_json, render)
    if check_vectors and result["vector_check"]["failures"]:
        ctx.exit(1)
