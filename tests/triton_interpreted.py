"""Run the Triton integer GEMM under TRITON_INTERPRET=1 on CPU tensors; compare it with the C kernel.

Run by tests/test_integer_gemm.py in a child process (the interpreter is chosen when Triton compiles a
kernel, so it must be switched on before ``hif4fmt.codec.triton_gemm`` is imported). Prints one JSON
object: {"cases": [{"shape": [m, k, n], "bias": bool, "equal": bool, "differing": int}, ...]}.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1")

import torch  # noqa: E402

import hif4fmt.hifloat4 as api  # noqa: E402
from hif4fmt.codec import integer, triton_gemm  # noqa: E402


def main() -> None:
    cases = []
    generator = torch.Generator().manual_seed(7)
    for m, k, n, with_bias in ((1, 64, 1, False), (5, 100, 40, True), (17, 192, 33, False), (40, 320, 70, True)):
        x = (torch.randn(m, k, generator=generator) * torch.exp2(torch.randn(k, generator=generator) * 3))
        w = torch.randn(n, k, generator=generator).to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        if m > 10:
            x[3, 70] = float("nan")  # a NaN unit: its row is NaN in both
        bias = torch.randn(n, generator=generator) if with_bias else None
        packed = api.quantize(w)
        a = integer.quantize_activation(x)
        expected = integer.product(a, packed, bias)  # the C kernel (or the torch path without it)
        got = triton_gemm.product(a, integer.expand(packed), bias)
        same = torch.equal(got.view(torch.int32), expected.view(torch.int32)) or (
            torch.equal(torch.isnan(got), torch.isnan(expected))
            and torch.equal(torch.nan_to_num(got).view(torch.int32), torch.nan_to_num(expected).view(torch.int32)))
        differing = int(((got.view(torch.int32) != expected.view(torch.int32))
                         & ~(torch.isnan(got) & torch.isnan(expected))).sum())  # NaN payloads may differ
        cases.append({"shape": [m, k, n], "bias": with_bias, "equal": bool(same), "differing": differing})
    print(json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
