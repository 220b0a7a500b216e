"""``wan-runtime``: render Wan videos with the BF16 base or with a HiF4 W4A4 state, and compare.

Why this module exists: it is the user-facing end of the project (docs/runtime.md, "CLI"). It parses
options, calls the library (``loader``, ``generate``, ``video``, ``frame_metrics``) and hands one plain
dict to ``hif4fmt.cli.output.emit`` for text or ``--json``. Errors are the typed ``Hif4Error``s, printed
as one line with their exit code by ``hif4fmt.cli.output.run_cli`` (1: base mismatch, 2: bad input).

    wan-runtime generate --base DIR [--state S.hif4] --prompt TEXT --out video.mp4 [--compare]
                         [--lora PATH[:SCALE] ...] [--lora-2 PATH[:SCALE] ...]
"""

from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from hif4fmt.atomic import check_outputs
from hif4fmt.cli.output import emit, print_notes, table

DTYPES = ("bfloat16", "float16", "float32")  # --dtype choices: names of torch dtypes
MODEL_DEFAULT = "the model's own (its layout's release settings, docs/runtime.md Models)"
ARITHMETIC_WORDS = {  # --arithmetic choices (wan_runtime.hif4_linear.ARITHMETICS), as the summary explains them
    "integer": "int8 GEMM, one float32 rescale per 64-element unit",
    "simulated": "toolkit QLinear: dequantized BF16 operands, F.linear",
}


def _quiet_libraries(show_progress: bool) -> None:
    """Drop transformers' torchvision notice (only it); keep the progress bars only when ``show_progress``."""
    from hif4fmt.library_noise import drop_torchvision_notice

    drop_torchvision_notice()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if not show_progress:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def _load_image(path: Path | None, width: int, height: int, fill: int):
    from PIL import Image, UnidentifiedImageError

    from wan_runtime.placeholder import placeholder_image

    if path is None:
        return placeholder_image(width, height, fill), f"blank {width}x{height}, every channel {fill}"
    try:
        with Image.open(path) as image:
            return image.convert("RGB"), str(path)
    except (OSError, UnidentifiedImageError) as exc:
        raise click.BadParameter(f"{path}: cannot read the image ({exc}); pass a PNG or JPEG file",
                                 param_hint="--image") from None


def _render(pipe, image, settings, show_progress: bool):
    """Return (uint8 frames, seconds) of one render."""
    from wan_runtime.generate import generate_frames

    pipe.set_progress_bar_config(disable=not show_progress)
    started = time.perf_counter()
    frames = generate_frames(pipe, image, settings)
    return frames, time.perf_counter() - started


def _output_paths(out: Path, compare: bool) -> dict[str, Path]:
    """Return the files one run writes, keyed as in the summary's ``outputs`` (an MP4 and a GIF per video)."""
    stem = out.with_suffix("")
    videos = {"": out} if not compare else {"bf16_": Path(f"{stem}.bf16.mp4"), "w4a4_": Path(f"{stem}.w4a4.mp4"),
                                            "compare_": out}
    return {f"{label}{kind}": path if kind == "mp4" else path.with_suffix(".gif")
            for label, path in videos.items() for kind in ("mp4", "gif")}


def _write(paths: dict[str, Path], videos: dict[str, Any], fps: float) -> dict[str, str]:
    """Write every video of ``videos`` (keyed like ``paths`` without the kind) as MP4 + GIF, as one set."""
    from wan_runtime.video import write_video_set

    items = []
    for key, path in paths.items():
        video, _, kind = key.rpartition("_")  # "mp4" -> ("", "mp4"); "bf16_gif" -> ("bf16", "gif")
        items.append((path, kind.upper(), videos[video]))
    write_video_set(items, fps)
    return {key: str(path) for key, path in paths.items()}


def _quantization(pipe) -> dict[str, Any]:
    from wan_runtime.loader import quantized_layers

    result = {}
    for component, layers in quantized_layers(pipe).items():
        packed = sum(layer.weight_nbytes for layer in layers)
        original = sum(layer.in_features * layer.out_features * layer.compute_dtype.itemsize for layer in layers)
        arithmetics = sorted({layer.arithmetic for layer in layers})
        result[component] = {"hif4_layers": len(layers), "packed_weight_bytes": packed,
                             "original_weight_bytes": original,
                             "arithmetic": arithmetics[0] if len(arithmetics) == 1 else (arithmetics or None)}
    return result


@contextmanager
def _lora_warnings_as_lines(found: list[str]):
    """Within the block, collect ``PartialLoraWarning`` messages into ``found`` and print each as one
    ``warning: ...`` line on stderr; other warnings are shown as usual."""
    from wan_runtime.lora import PartialLoraWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartialLoraWarning)
        try:
            yield
        finally:
            for item in caught:
                if issubclass(item.category, PartialLoraWarning):
                    found.append(str(item.message))
                    click.echo(f"warning: {item.message}", err=True)
                else:
                    warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def _render_text(result: dict[str, Any]) -> str:
    lines = [f"mode:     {result['mode']}", f"base:     {result['base']}",
             f"model:    {result['layout']} ({result['pipeline']}, {'+'.join(result['experts'])}; flow shift "
             f"{result['flow_shift']} from its scheduler config)"]
    if result["state"]:
        lines.append(f"state:    {result['state']} (verified: {result['verified']})")
    if result.get("arithmetic"):
        lines.append(f"W4A4:     {result['arithmetic']} arithmetic ({ARITHMETIC_WORDS[result['arithmetic']]})")
    for lora in result.get("loras", []):
        lines.append(f"lora:     {lora['path']} -> {lora['expert']}, scale {lora['scale']:g}, {lora['layers']} layers, "
                     f"sha256 {lora['sha256']}")
    lines.append(f"video:    {result['frames']} frames {result['width']}x{result['height']}, seed {result['seed']}")
    for component, info in result["quantization"].items():
        if info["hif4_layers"]:
            lines.append(f"{component}: {info['hif4_layers']} HiF4 linears, weights {info['packed_weight_bytes']} B "
                         f"packed (were {info['original_weight_bytes']} B)")
    for name, seconds in result["seconds"].items():
        lines.append(f"time {name}: {seconds:.2f} s")
    for kind, path in result["outputs"].items():
        lines.append(f"wrote {kind}: {path}")
    compare = result.get("compare")
    if compare:
        rows = [[index, "inf" if psnr is None else f"{psnr:.2f}", f"{ssim:.4f}"]
                for index, (psnr, ssim) in enumerate(zip(compare["psnr_db"], compare["ssim"]))]
        plus = " (both with the LoRAs)" if result.get("loras") else ""
        lines.append(f"W4A4 vs BF16{plus} per frame (left: BF16, right: W4A4 in the comparison video):")
        lines.append(table(rows, ["frame", "PSNR dB", "SSIM"]))
        mean = compare["mean_psnr_db"]
        lines.append(f"mean PSNR {'inf' if mean is None else f'{mean:.2f}'} dB, mean SSIM {compare['mean_ssim']:.4f}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def cli(debug: bool) -> None:
    """wan-runtime: Wan video models with HiF4 W4A4 transformers rebuilt from a base checkpoint and a .hif4 state."""


@cli.command("generate")
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="Diffusers Wan model folder (model_index.json, transformer/, ...): Wan2.2 I2V/T2V A14B, TI2V-5B, "
                   "Wan2.1 T2V/I2V.")
@click.option("--state", "state_path", type=click.Path(path_type=Path), default=None,
              help=".hif4 state; omit for the plain BF16 model.")
@click.option("--prompt", default="a cat walks on the beach at sunset", show_default=True)
@click.option("--negative-prompt", default="", show_default=True)
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="First frame (PNG/JPEG) for image-to-video models and Wan2.2-TI2V; default: a blank image (see "
                   "--image-fill) for I2V as in calibration, none (text to video) for TI2V; refused for T2V models.")
@click.option("--image-fill", default=0, show_default=True, type=click.IntRange(0, 255),
              help="Channel value of the blank placeholder image used without --image.")
@click.option("--height", type=int, default=None, help=f"Pixels, multiple of the VAE stride x patch (16; 32 for "
              f"TI2V-5B). Default: {MODEL_DEFAULT}.")
@click.option("--width", type=int, default=None, help=f"Pixels, as --height. Default: {MODEL_DEFAULT}.")
@click.option("--frames", type=int, default=None, help=f"4k + 1. Default: {MODEL_DEFAULT}.")
@click.option("--steps", type=int, default=None, help=f"Denoising steps. Default: {MODEL_DEFAULT}.")
@click.option("--guidance", type=float, default=None, help=f"Classifier-free guidance scale. Default: {MODEL_DEFAULT}.")
@click.option("--guidance-2", type=float, default=None,
              help="Guidance of the low-noise expert (two-expert models only). Default: the model's, else --guidance.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-sequence-length", default=512, show_default=True, help="Prompt tokens (padded/truncated).")
@click.option("--fps", default=None, type=click.FloatRange(min=0, min_open=True),
              help=f"Frames per second of the written files. Default: {MODEL_DEFAULT}. The flow shift is always the "
                   "base's scheduler_config.json value.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=Path("video.mp4"), show_default=True,
              help="MP4 to write; a GIF is written next to it.")
@click.option("--compare", is_flag=True,
              help="Render BF16 and W4A4 (needs --state; with --lora, BF16+LoRA and W4A4+LoRA); write both, side by "
                   "side, and per-frame PSNR/SSIM.")
@click.option("--force", is_flag=True, help="Replace videos that already exist at --out (and its GIF).")
@click.option("--no-verify", is_flag=True, help="Skip the base fingerprint check (explicit opt-out).")
@click.option("--lora", "lora_args", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA (.safetensors) merged into transformer (high-noise expert) before packing; repeatable; "
                   "SCALE defaults to 1.0.")
@click.option("--lora-2", "lora_2_args", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA merged into transformer_2 (low-noise expert); repeatable.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--arithmetic", type=click.Choice(sorted(ARITHMETIC_WORDS)), default=None,
              help="How the W4A4 linears compute: integer (int8 GEMM with a float32 rescale per 64-element unit, "
                   "spec/hifloat4.md 8) or simulated (the challenge toolkit's QLinear, bit for bit). Default: integer "
                   "where a compiled integer kernel exists for --device (the CPU kernel, Triton on CUDA), else "
                   "simulated.")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True,
              help="Transformer and text-encoder dtype (the VAE runs in float32).")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: when a TTY).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def generate_cmd(base_dir: Path, state_path: Path | None, prompt: str, negative_prompt: str, image_path: Path | None,
                 image_fill: int, height: int | None, width: int | None, frames: int | None, steps: int | None,
                 guidance: float | None, guidance_2: float | None, seed: int, max_sequence_length: int, fps: float | None, out_path: Path, compare: bool, force: bool, no_verify: bool,
                 lora_args: tuple[str, ...], lora_2_args: tuple[str, ...], device: str, arithmetic: str | None,
                 dtype: str, progress: bool | None, as_json: bool) -> None:
    """Render one video (BF16 without --state, W4A4 with it); with --compare, both and their distance.

    The pipeline class, the experts and the defaults of the size, frame, step, guidance and fps
    options come from the base (its model_index.json, scheduler config and layout).
    """
    import torch

    from wan_runtime.frame_metrics import compare_videos
    from wan_runtime.generate import GenerationSettings
    from wan_runtime.hif4_linear import resolve_arithmetic
    from wan_runtime.loader import apply_state, base_profile, check_device, load_pipeline, read_bound_state
    from wan_runtime.lora import parse_lora_argument
    from wan_runtime.video import side_by_side

    profile = base_profile(base_dir)
    model = profile.layout.defaults
    with_image = image_path is not None
    problem = profile.image_problem(with_image) or profile.text_length_problem(max_sequence_length)
    if problem:
        raise click.UsageError(problem)
    if guidance_2 is not None and len(profile.transformers) < 2:
        raise click.UsageError(f"--guidance-2: {profile.name} has one transformer (no low-noise expert); drop it")
    if guidance_2 is None and guidance is None:  # the model's pair of scales (Wan2.2-T2V: 4.0 / 3.0)
        guidance_2 = model.guidance_2
    height = model.height if height is None else height
    width = model.width if width is None else width
    frames = model.frames if frames is None else frames
    steps = model.steps if steps is None else steps
    guidance = model.guidance if guidance is None else guidance
    fps = model.fps if fps is None else fps
    settings = GenerationSettings(prompt, negative_prompt, height, width, frames, steps, guidance, seed,
                                  max_sequence_length, guidance_2, profile.spatial_multiple)
    problems = settings.problems()
    if compare and state_path is None:
        problems.append("--compare needs --state (it compares W4A4 with BF16)")
    if fps <= 0:
        problems.append(f"--fps {fps}: must be > 0")
    if problems:
        raise click.UsageError("; ".join(problems))
    if arithmetic is not None and state_path is None:
        raise click.UsageError("--arithmetic needs --state (the BF16 model has no W4A4 layers)")
    arithmetic = resolve_arithmetic(arithmetic, check_device(device)) if state_path is not None else None
    paths = _output_paths(out_path, compare)
    inputs = {label: path for label, path in (("--state", state_path), ("--image", image_path)) if path is not None}
    print_notes(check_outputs({f"--out ({key})": path for key, path in paths.items()}, inputs=inputs,
                              input_folders={"--base": base_dir}, force=force))
    loras = [parse_lora_argument(text) for text in lora_args]  # LoraScaleError (exit 2) before any work
    loras_2 = [parse_lora_argument(text) for text in lora_2_args]
    show_progress = sys.stderr.isatty() if progress is None else progress
    _quiet_libraries(show_progress)
    torch_dtype = getattr(torch, dtype)
    image, image_name = _load_image(image_path, width, height, image_fill) if profile.uses_image(with_image) \
        else (None, "none (text to video)")
    seconds: dict[str, float] = {}
    outputs: dict[str, str] = {}
    result: dict[str, Any] = {"base": str(base_dir), "layout": profile.name,
                              "pipeline": profile.pipeline_for(with_image), "experts": list(profile.transformers),
                              "flow_shift": profile.flow_shift, "guidance_2": guidance_2, "fps": fps,
                              "state": str(state_path) if state_path else None,
                              "verified": bool(state_path) and not no_verify, "prompt": prompt, "image": image_name,
                              "height": height, "width": width, "frames": frames, "steps": steps,
                              "guidance": guidance, "seed": seed, "device": device, "dtype": dtype,
                              "arithmetic": arithmetic}
    lora_warnings: list[str] = []
    started = time.perf_counter()
    if compare:
        result["mode"] = "compare"
        state = read_bound_state(base_dir, state_path, verify=not no_verify)  # refuse before rendering anything
        with _lora_warnings_as_lines(lora_warnings):
            pipe = load_pipeline(base_dir, None, device=device, dtype=torch_dtype, loras=loras, loras_2=loras_2,
                                 with_image=with_image)
        seconds["load"] = time.perf_counter() - started
        bf16_frames, seconds["render_bf16"] = _render(pipe, image, settings, show_progress)
        started = time.perf_counter()
        apply_state(pipe, state, device, arithmetic)  # same pipeline, same VAE and text encoder: only the experts change
        seconds["apply_state"] = time.perf_counter() - started
        w4a4_frames, seconds["render_w4a4"] = _render(pipe, image, settings, show_progress)
        outputs = _write(paths, {"bf16": bf16_frames, "w4a4": w4a4_frames,
                                 "compare": side_by_side(bf16_frames, w4a4_frames)}, fps)
        result["compare"] = compare_videos(bf16_frames, w4a4_frames)
    else:
        result["mode"] = "w4a4" if state_path else "bf16"
        with _lora_warnings_as_lines(lora_warnings):
            pipe = load_pipeline(base_dir, state_path, verify=not no_verify, device=device, dtype=torch_dtype,
                                 arithmetic=arithmetic, loras=loras, loras_2=loras_2, with_image=with_image)
        seconds["load"] = time.perf_counter() - started
        video, seconds["render"] = _render(pipe, image, settings, show_progress)
        outputs = _write(paths, {"": video}, fps)
    result["loras"] = [lora.as_dict() for lora in getattr(pipe, "applied_loras", [])]
    if lora_warnings:
        result["lora_warnings"] = lora_warnings
    result["quantization"] = _quantization(pipe)
    result["seconds"] = seconds
    result["outputs"] = outputs
    emit(result, as_json, _render_text)


def main() -> None:
    """Console-script entry point (``wan-runtime``): typed errors become one stderr line and an exit code."""
    from hif4fmt.cli.output import run_cli

    run_cli(cli, {"generate": "runtime"})


if __name__ == "__main__":
    main()
