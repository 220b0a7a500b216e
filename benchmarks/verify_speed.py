"""Benchmark: fingerprint / verify throughput on a synthetic base vs two SHA-256 baselines on the same files.

Why: ``hif4fmt verify`` hashes every byte of the base (57 GB for Wan2.2-I2V-A14B), so it must be at least
as fast as hashing the safetensors files with a standard tool, measured here in the same run on the same
(page-cached) files. Two baselines: coreutils ``sha256sum`` (on many machines built without the SHA-NI
instructions, so slow: an easy bar) and ``openssl dgst -sha256`` (one process, uses SHA-NI where the CPU
has it: the fair bar, and the one the README quotes). Both hash one file after another on one core;
``verify`` uses several threads. Writes a random-byte base of ``--size-gb`` (default 2) into a temp
folder under /tmp, two components with Wan-like BF16 tensors (5120 x 5120 and 13824 x 5120), and deletes
it afterwards.

    python benchmarks/verify_speed.py [--size-gb 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hif4fmt.fingerprint import default_threads, fingerprint_base  # noqa: E402
from hif4fmt.recipe import Recipe  # noqa: E402
from hif4fmt.state import BaseBinding, QuantizedLayer, State, write_state  # noqa: E402
from hif4fmt.verify import verify_state  # noqa: E402

DIM, FFN = 5120, 13824  # Wan2.2 A14B hidden size and FFN width
SHAPES = ((DIM, DIM), (FFN, DIM), (DIM, FFN))  # a q/k/v/out-like, ffn.net.0.proj-like and ffn.net.2-like weight
WRITE_CHUNK = 64 * 1024 * 1024


def write_random_component(folder: Path, target_bytes: int, rng: np.random.Generator) -> int:
    """Write one component of about ``target_bytes`` of random BF16 weights; return bytes written."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    tensors, total, index = [], 0, 0
    while total < target_bytes:
        shape = SHAPES[index % len(SHAPES)]
        nbytes = shape[0] * shape[1] * 2
        tensors.append((f"blocks.{index // 10}.linear{index % 10}.weight", shape, nbytes))
        total += nbytes
        index += 1
    header, offset = {}, 0
    for name, shape, nbytes in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as handle:
        handle.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        remaining = total
        while remaining:
            chunk = min(WRITE_CHUNK, remaining)
            handle.write(rng.bytes(chunk))
            remaining -= chunk
    return total


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="total base size in GB (10^9 bytes)")
    parser.add_argument("--threads", type=int, default=None, help="hashing threads (default: CPU count)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="hif4-verify-bench-", dir="/tmp") as temp:
        base = Path(temp) / "base"
        per_component = int(args.size_gb * 1e9 / 2)
        total = sum(write_random_component(base / name, per_component, rng) for name in ("transformer", "transformer_2"))
        (base / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"],
                                                           "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
        files = sorted(str(p) for p in base.rglob("*.safetensors"))
        disk_bytes = sum(Path(f).stat().st_size for f in files)
        subprocess.run(["sha256sum", *files], check=True, capture_output=True)  # warm the page cache
        sha_s, _ = timed(lambda: subprocess.run(["sha256sum", *files], check=True, capture_output=True))
        openssl = shutil.which("openssl")
        ssl_s = None
        if openssl:
            ssl_s, _ = timed(lambda: subprocess.run([openssl, "dgst", "-sha256", *files], check=True,
                                                    capture_output=True))
        fp_s, fingerprint = timed(lambda: fingerprint_base(base, args.threads))
        fp1_s, _ = timed(lambda: fingerprint_base(base, 1))
        digest = fingerprint.components["transformer"].tensors["blocks.0.linear0.weight"]
        state = State(Recipe(), {}, BaseBinding.from_fingerprint(fingerprint), (QuantizedLayer(
            "transformer", "blocks.0.linear0", DIM, DIM, np.ones(DIM, np.float32), digest),), ())
        write_state(Path(temp) / "s.hif4", state)
        verify_s, report = timed(lambda: verify_state(Path(temp) / "s.hif4", base, args.threads))
        assert report.ok, report.message
    gb = disk_bytes / 1e9
    print(f"base: {gb:.2f} GB on disk ({total} tensor bytes, 2 components), page cache warm, "
          f"{args.threads or default_threads()} hashing threads")
    print(f"sha256sum (baseline)          {sha_s:7.2f} s  {gb / sha_s:6.2f} GB/s")
    if ssl_s is not None:
        print(f"openssl dgst -sha256 (fair)   {ssl_s:7.2f} s  {gb / ssl_s:6.2f} GB/s")
    else:
        print("openssl dgst -sha256 (fair)   not measured: no openssl on PATH")
    for label, seconds in (("fingerprint, 1 thread", fp1_s), ("fingerprint, threaded", fp_s),
                           ("hif4fmt verify (full)", verify_s)):
        versus = f"vs sha256sum {sha_s / seconds:.2f}x"
        if ssl_s is not None:
            versus += f", vs openssl {ssl_s / seconds:.2f}x"
        print(f"{label:<29} {seconds:7.2f} s  {gb / seconds:6.2f} GB/s  {versus}")
    print("(ratios > 1: faster than the baseline; openssl is the fair one where sha256sum lacks SHA-NI)")


if __name__ == "__main__":
    main()
