"""Throughput of the calibration sketch against the cheapest statistic, against the layer it observes, and
the cost of the hooks on a whole calibration.

Why this benchmark exists: the hook runs on every call of every quantized linear during calibration, so
its cost must stay a modest fraction of the model's own work (goals, issue 14: sketch update at most
0.1x the layer's BF16 matmul at A14B shapes; a hooked calibration at most 1.2x the plain pipeline call).

Part 1, for activation blocks shaped like Wan2.2-A14B's (inner 5120, FFN 13824; BF16), times in one run
on the same tensors:

  * baseline  ``x.abs().amax(0)``: the per-channel max alone (what a max-only calibration would do);
  * sketch    ``ChannelSketch.update(x)``: histogram + exact max/min + non-finite count, on the path
              calibration runs (the compiled kernel when built: ``hif4fmt.calibration.sketch_kernel``);
  * torch     the same through the torch path (``HIF4FMT_SKETCH_KERNEL=0``), the pre-kernel figure;
  * holdout   ``HoldoutSample.offer(x, ...)``: bottom-64 row selection by splitmix64 key;
  * linear    ``x @ W.T`` with W (out_features, channels) BF16 of the real layer: its own matmul;

and prints each as elements per second and as a ratio to the baseline, then the sketch's cost as a
fraction of the layer's matmul (the hook's overhead on that layer's forward, roughly).

Part 2 (skipped with ``--no-pipeline``) builds the ``--medium`` tiny model (tools/make_tiny_wan.py: 10
blocks, inner dim 768) and times one calibration record, i.e. one pipeline call with the calibration
protocol below, plain and with every quantized linear hooked (sketch + held-out rows), with the sketch
kernel and with the torch path, in interleaved rounds (medians); it prints hooked / plain. No timing is asserted anywhere.

    .venv/bin/python benchmarks/calibration_sketch_speed.py [--tokens 4096] [--repeats 5] [--no-layers] [--no-pipeline]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hif4fmt.calibration import sketch_kernel
from hif4fmt.calibration.hooks import HoldoutSample
from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid

# label -> (in_features, out_features) of Wan2.2-A14B's quantized linears
SHAPES = {"attention 5120 -> 5120": (5120, 5120), "ffn.net.0 5120 -> 13824": (5120, 13824),
          "ffn.net.2 13824 -> 5120": (13824, 5120)}
A14B_INPUT_CHANNELS = 4_792_320  # over the 800 quantized linears (spec/stats-v1.md 2.3)


def _time(function, repeats: int) -> float:
    """Return the median wall time in seconds of ``function()`` over ``repeats`` runs after one warm-up."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class _TorchPath:
    """Within this block the sketch runs its torch path (HIF4FMT_SKETCH_KERNEL=0)."""

    def __enter__(self):
        self.before = os.environ.get(sketch_kernel.DISABLE_ENV)
        os.environ[sketch_kernel.DISABLE_ENV] = "0"

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop(sketch_kernel.DISABLE_ENV, None)
        else:
            os.environ[sketch_kernel.DISABLE_ENV] = self.before


def _torch_path_update(sketch: ChannelSketch, x: torch.Tensor) -> None:
    with _TorchPath():
        sketch.update(x)


def layer_shapes(args: argparse.Namespace) -> None:
    """Part 1: the sketch update against max-only and against the layer's matmul, A14B shapes."""
    g = torch.Generator().manual_seed(args.seed)
    grid = SketchGrid()
    print(f"{'activation':26} {'method':9} {'seconds':>9} {'Melem/s':>9} {'x baseline':>10}")
    ratios, torch_ratios = [], []
    for label, (channels, out_features) in SHAPES.items():
        x = (torch.randn(args.tokens, channels, generator=g) * 2).to(torch.bfloat16)
        weight = (torch.randn(out_features, channels, generator=g) * 0.02).to(torch.bfloat16)
        sketch = ChannelSketch(grid, channels)
        reference = ChannelSketch(grid, channels)
        sample = HoldoutSample(64, channels)
        calls = iter(range(10 ** 6))
        timings = {
            "baseline": _time(lambda: x.abs().amax(0), args.repeats),
            "sketch": _time(lambda: sketch.update(x), args.repeats),
            "torch": _time(lambda: _torch_path_update(reference, x), max(1, args.repeats // 2)),
            "holdout": _time(lambda: sample.offer(x, 0, next(calls)), args.repeats),
            "linear": _time(lambda: x @ weight.T, max(1, args.repeats // 2)),
        }
        elements = x.numel()
        for method, seconds in timings.items():
            print(f"{label:26} {method:9} {seconds:9.4f} {elements / seconds / 1e6:9.1f} "
                  f"{seconds / timings['baseline']:10.2f}")
        ratios.append(f"{label}: {timings['sketch'] / timings['linear']:.3f}")
        torch_ratios.append(f"{label}: {timings['torch'] / timings['linear']:.3f}")
    print("sketch time / layer matmul time (goal <= 0.1):", ", ".join(ratios))
    print("torch-path sketch time / layer matmul time:   ", ", ".join(torch_ratios))
    for name, count_bytes in (("int64 (default)", 8), ("int32 (--sketch-counts int32)", 4)):
        print(f"A14B sketch memory, {name}: {A14B_INPUT_CHANNELS:,} input channels x {grid.bins} bins x "
              f"{count_bytes} bytes + 16 bytes max/min/non-finite = "
              f"{A14B_INPUT_CHANNELS * (grid.bins * count_bytes + 16) / 1e9:.2f} GB")


def whole_calibration(args: argparse.Namespace) -> None:
    """Part 2: one calibration record of the --medium model, plain vs hooked (kernel and torch path)."""
    from hif4fmt.calibration.hooks import ActivationCollector
    from hif4fmt.calibration.protocol import CalibrationProtocol
    from hif4fmt.calibration.runner import blank_image, load_pipeline
    from hif4fmt.targets import plan_model
    from tools.make_tiny_wan import make_tiny_wan

    protocol = CalibrationProtocol(num_prompts=1, height=args.height, width=args.width, frames=args.frames,
                                   steps=args.steps, max_sequence_length=args.max_sequence_length)
    with tempfile.TemporaryDirectory() as temp:
        base = make_tiny_wan(Path(temp) / "medium", seed=0, medium=True)
        pipe = load_pipeline(base, protocol.dtype, torch.device("cpu"), "none", show_progress=False)
        pipe.set_progress_bar_config(disable=True)
        models = {name: getattr(pipe, name) for name in ("transformer", "transformer_2")}
        plans = plan_model(models)
        image = blank_image(protocol)

        def record() -> None:
            pipe(image=image, prompt="a cat walks on the beach at sunset", negative_prompt=protocol.negative_prompt,
                 height=protocol.height, width=protocol.width, num_frames=protocol.frames,
                 num_inference_steps=protocol.steps, guidance_scale=protocol.guidance,
                 generator=torch.Generator("cpu").manual_seed(protocol.seed), output_type="latent",
                 max_sequence_length=protocol.max_sequence_length)

        def hooked() -> None:
            collector = ActivationCollector(models, plans, SketchGrid(), 64)
            collector.begin_record(0)
            try:
                record()
            finally:
                collector.remove()

        def hooked_torch_path() -> None:
            with _TorchPath():
                hooked()

        latent_tokens = ((protocol.frames - 1) // 4 + 1) * (protocol.height // 16) * (protocol.width // 16)
        print(f"medium model (10 blocks x 2 experts, inner 768), {protocol.height}x{protocol.width}, "
              f"{protocol.frames} frames ({latent_tokens} tokens per call), {protocol.steps} steps x 2 CFG branches")
        # interleaved rounds (plain, hooked, hooked torch path), medians: load on a shared machine drifts
        # over minutes, and interleaving spreads it over the three alike
        methods = {"plain": record, "kernel": hooked, "torch": hooked_torch_path}
        for function in methods.values():
            function()  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.pipeline_repeats):
            for name, function in methods.items():
                start = time.perf_counter()
                function()
                samples[name].append(time.perf_counter() - start)
        plain_seconds, kernel_seconds, torch_seconds = (statistics.median(samples[name]) for name in methods)
        print(f"plain pipeline call           {plain_seconds:8.2f} s  (rounds: "
              f"{', '.join(f'{t:.2f}' for t in samples['plain'])})")
        print(f"hooked, sketch kernel         {kernel_seconds:8.2f} s  {kernel_seconds / plain_seconds:5.2f}x plain "
              f"(goal <= 1.2)")
        print(f"hooked, torch sketch path     {torch_seconds:8.2f} s  {torch_seconds / plain_seconds:5.2f}x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="activation rows per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-layers", action="store_true", help="skip part 1 (the A14B layer shapes)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip part 2 (the whole calibration)")
    parser.add_argument("--pipeline-repeats", type=int, default=5)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens per call, "
          f"grid {SketchGrid().bins} bins")
    print(sketch_kernel.status(), flush=True)
    if not args.no_layers:
        layer_shapes(args)
    if not args.no_pipeline:
        whole_calibration(args)


if __name__ == "__main__":
    main()
