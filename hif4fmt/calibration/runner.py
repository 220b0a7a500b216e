"""Run the real Wan pipeline of a base over the calibration prompts with hooks on every target linear.

Why this module exists: it is the one place that ties the protocol, the prompts, the diffusers
pipeline the base declares (``WanPipeline`` for text to video, ``WanImageToVideoPipeline`` for image
to video; one transformer or two experts switched by ``boundary_ratio``; ``hif4fmt.layouts``), the
hooks, the scale-out and the statistics file together (spec 2). Text-to-video models run without an
image, image-to-video models with the blank placeholder or ``--image``, Wan2.2-TI2V either way (with
an image it runs as WanImageToVideoPipeline over the same components), Wan2.1-I2V through its CLIP
image encoder. Every denoising step, both classifier-free-guidance branches and every expert are observed; the VAE decode is skipped (``output_type="latent"``) because no linear
we quantize runs there. Record i uses a CPU generator seeded with ``seed + i``, so a record's
activations do not depend on which process runs it or in which order. Library noise is kept narrow:
only transformers' torchvision-fallback notice is dropped, and the loading bars follow ``--no-progress``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from hif4fmt.atomic import check_outputs
from hif4fmt.calibration.constants import MAX_HOLDOUT_ROWS
from hif4fmt.calibration.distributed import (
    ProcessGroup,
    finish,
    init_from_environment,
    merge_across_processes,
    shard_records,
)
from hif4fmt.calibration.hooks import ActivationCollector
from hif4fmt.calibration.prompts import load_prompts
from hif4fmt.calibration.protocol import DEFAULT_MAX_SEQUENCE_LENGTH, PIPELINE_PREFIX, CalibrationProtocol
from hif4fmt.calibration.sketch import SKETCH_COUNT_DTYPES, SketchGrid
from hif4fmt.calibration.stats_file import write_stats
from hif4fmt.errors import BaseCheckpointError, CalibrationError
from hif4fmt.library_noise import drop_torchvision_notice
from hif4fmt.recipe import COMPONENTS
from hif4fmt.targets import plan_model

DEVICES = ("auto", "cpu", "cuda")
OFFLOAD_MODES = ("none", "model")  # model: diffusers enable_model_cpu_offload (one component on the GPU at a time)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
@contextlib.contextmanager
def _loading_progress_bars(show: bool):
    """Within the block, show diffusers' and transformers' loading bars only when ``show``; restore after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    if not show:
        for library in libraries:
            library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, enabled):
            (library.enable_progress_bar if was_enabled else library.disable_progress_bar)()


def resolve_device(device: str) -> str:
    """Return "cuda" or "cpu" for ``device`` ("auto" picks CUDA when available)."""
    if device not in DEVICES:
        raise CalibrationError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return device


def base_profile(base: Path) -> Any:
    """Return the base's ``hif4fmt.layouts.PipelineProfile``; ``CalibrationError`` naming the folder otherwise."""
    from hif4fmt.layouts import pipeline_profile

    if not (base / "model_index.json").is_file():
        raise CalibrationError(f"{base}: no model_index.json; calibration needs the whole diffusers "
                               f"Wan folder (text encoder, VAE, scheduler, transformers)")
    try:
        return pipeline_profile(base)
    except BaseCheckpointError as exc:
        raise CalibrationError(str(exc)) from None


def protocol_for_base(base: str | Path, image: str | Path | None = None, **fields: Any) -> CalibrationProtocol:
    """Return the protocol for ``base``: ``fields`` as given, the rest the model's defaults, layout facts filled.

    The layout, pipeline class and experts come from the base (``hif4fmt.layouts``); height, width,
    frames, steps and guidance default to ``protocol.defaults_for`` the model. ``image`` (a file) is
    refused for text-to-video models; for the others it replaces the blank placeholder (its SHA-256 is
    recorded). Raises ``CalibrationError`` for a base that is no Wan layout or a bad field.
    """
    from hif4fmt.calibration.protocol import defaults_for

    profile = base_profile(Path(base))
    problem = profile.image_problem(image is not None)
    if problem:
        raise CalibrationError(problem)
    values = {**defaults_for(profile), **{name: value for name, value in fields.items() if value is not None}}
    if fields.get("guidance") is not None and fields.get("guidance_2") is None:
        values["guidance_2"] = None  # an explicit --guidance guides both experts, as in the runtime
    problem = profile.text_length_problem(values.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
    if problem:
        raise CalibrationError(problem)
    uses_image = profile.uses_image(image is not None)
    values.update(layout=profile.name, pipeline=PIPELINE_PREFIX + profile.pipeline_for(image is not None),
                  experts=profile.transformers, image_source="file" if image is not None else
                  ("blank" if uses_image else "none"),
                  image_sha256=_file_sha256(Path(image)) if image is not None else None)
    return CalibrationProtocol(**values)


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise CalibrationError(f"--image {path}: cannot read: {exc}") from None


def check_protocol_matches_base(base: Path, protocol: CalibrationProtocol) -> None:
    """Raise ``CalibrationError`` when ``protocol`` was made for another layout than the base's."""
    profile = base_profile(base)
    pipelines = {profile.pipeline_for(False), profile.pipeline_for(profile.image_problem(True) is None)}
    if protocol.layout != profile.name or protocol.experts != profile.transformers or \
            protocol.pipeline_class not in pipelines:
        raise CalibrationError(
            f"protocol is for layout {protocol.layout} ({protocol.pipeline_class}, {'+'.join(protocol.experts)}) "
            f"but {base} is {profile.name} ({profile.pipeline}, {'+'.join(profile.transformers)}); build the "
            f"protocol from the base (hif4fmt.calibration.runner.protocol_for_base, or hif4fmt calibrate)")


def load_pipeline(base: Path, dtype: str, device: torch.device, offload: str, show_progress: bool = True,
                  pipeline_class: str | None = None) -> Any:
    """Return the diffusers pipeline at ``base``: transformers/text encoder in ``dtype``, VAE float32.

    ``pipeline_class`` ("WanPipeline", "WanImageToVideoPipeline"; None: the one model_index.json names)
    is the class loaded. ``show_progress`` False hides the libraries' loading bars (``--no-progress``,
    and ranks other than 0).
    """
    drop_torchvision_notice()
    import diffusers

    if offload not in OFFLOAD_MODES:
        raise CalibrationError(f"--offload {offload!r}: expected one of {', '.join(OFFLOAD_MODES)}")
    pipeline_class = pipeline_class or base_profile(base).pipeline
    try:
        with _loading_progress_bars(show_progress):
            vae = diffusers.AutoencoderKLWan.from_pretrained(base, subfolder="vae", dtype=torch.float32)
            pipe = getattr(diffusers, pipeline_class).from_pretrained(base, vae=vae, dtype=TORCH_DTYPES[dtype])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CalibrationError(f"{base}: diffusers cannot load {pipeline_class}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    if offload == "model" and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def check_protocol_fits(pipe: Any, protocol: CalibrationProtocol) -> None:
    """Raise ``CalibrationError`` when height/width are not multiples of the VAE stride x patch size.

    (The pipeline would silently round them down, making the recorded protocol wrong.)
    """
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    patch = transformer.config.patch_size
    for name, value, axis in (("height", protocol.height, 1), ("width", protocol.width, 2)):
        multiple = pipe.vae_scale_factor_spatial * patch[axis]
        if value % multiple:
            raise CalibrationError(f"--{name} {value}: must be a multiple of {multiple} (VAE stride "
                                   f"{pipe.vae_scale_factor_spatial} x patch {patch[axis]}), e.g. "
                                   f"{value // multiple * multiple or multiple}")


def blank_image(protocol: CalibrationProtocol) -> Any:
    """Return the explicit placeholder image: RGB ``width`` x ``height``, every channel ``image_fill``."""
    from PIL import Image

    fill = protocol.image_fill
    return Image.new("RGB", (protocol.width, protocol.height), (fill, fill, fill))


def protocol_image(protocol: CalibrationProtocol, image_path: Path | None) -> Any:
    """Return the first frame the protocol prescribes: None (text to video), the blank image, or the file.

    The file must be the one whose SHA-256 the protocol records (``CalibrationError`` otherwise).
    """
    from PIL import Image, UnidentifiedImageError

    if protocol.image_source == "none":
        return None
    if protocol.image_source == "blank":
        return blank_image(protocol)
    if image_path is None or _file_sha256(Path(image_path)) != protocol.image_sha256:
        raise CalibrationError(f"protocol image_sha256 {protocol.image_sha256}: pass that image file as --image "
                               f"(given: {image_path})")
    try:
        with Image.open(image_path) as image:
            return image.convert("RGB").resize((protocol.width, protocol.height))
    except (OSError, UnidentifiedImageError) as exc:
        raise CalibrationError(f"--image {image_path}: cannot read the image ({exc}); pass a PNG or JPEG") from None


def _base_binding(base: Path) -> dict[str, Any]:
    """Return the stats file's base provenance: fingerprint algorithm, digest, per-component digests, bytes."""
    from hif4fmt.fingerprint import fingerprint_base

    fingerprint = fingerprint_base(base)
    return {"algorithm": fingerprint.algorithm, "fingerprint": fingerprint.fingerprint,
            "components": {name: c.digest for name, c in sorted(fingerprint.components.items())},
            "total_bytes": fingerprint.total_bytes}


def run_calibration(base: str | Path, prompts_path: str | Path, out: str | Path,
                    protocol: CalibrationProtocol, grid: SketchGrid | None = None,
                    holdout_rows: int = 64, device: str = "auto", sketch_device: str | None = None,
                    offload: str = "none", progress: bool = True, force: bool = False,
                    sketch_counts: str = "int64", image: str | Path | None = None) -> dict[str, Any]:
    """Calibrate and write the statistics file ``out`` (rank 0); return a summary dict.

    ``out`` is checked before the model is loaded (``hif4fmt.atomic.check_outputs``: not the prompt
    file, not inside the base folder, folder exists and is writable, an existing file only with
    ``force``); the summary's ``notes`` list leftovers of interrupted writes that were cleared.
    ``sketch_counts`` "int32" holds the histograms in half the memory (exact: promoted to int64 before
    a count could pass 2**31 - 1); the file holds int64 counts either way (spec 3.4).
    Under ``torchrun`` the prompts are sharded over the processes and the statistics merged before
    rank 0 writes them. ``protocol`` must be made for the base's layout (``protocol_for_base``);
    ``image`` is the file of a protocol with ``image_source`` "file". Raises ``CalibrationError`` for
    bad options or prompts, a protocol of another layout, a pipeline that cannot be loaded, or a target
    layer that was never run (e.g. too few steps to reach the second expert).
    """
    started = time.monotonic()
    base, out = Path(base), Path(out)
    grid = (grid or SketchGrid()).validate()
    if sketch_counts not in SKETCH_COUNT_DTYPES:
        raise CalibrationError(f"--sketch-counts {sketch_counts!r}: expected one of {', '.join(SKETCH_COUNT_DTYPES)}")
    if type(holdout_rows) is not int or not 0 <= holdout_rows <= MAX_HOLDOUT_ROWS:
        raise CalibrationError(f"--holdout-rows {holdout_rows!r}: expected an integer in [0, {MAX_HOLDOUT_ROWS}]")
    inputs = {"--prompts": Path(prompts_path), **({"--image": Path(image)} if image is not None else {})}
    notes = check_outputs({"--out": out}, inputs=inputs, input_folders={"--base": base}, force=force)
    check_protocol_matches_base(base, protocol)
    first_frame = protocol_image(protocol, image)
    prompts = load_prompts(prompts_path, protocol.num_prompts)
    device_type = resolve_device(device)
    group = init_from_environment(device_type)
    run_device = torch.device("cuda", group.local_rank) if device_type == "cuda" else torch.device("cpu")
    pipe = load_pipeline(base, protocol.dtype, run_device, offload, show_progress=progress and group.is_main,
                         pipeline_class=protocol.pipeline_class)
    models = {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}
    check_protocol_fits(pipe, protocol)
    plans = plan_model(models)
    collector = ActivationCollector(models, plans, grid, holdout_rows, sketch_device,
                                    SKETCH_COUNT_DTYPES[sketch_counts])
    records = shard_records(len(prompts.prompts), group)
    try:
        _run_records(pipe, collector, prompts.prompts, records, protocol, group, progress, first_frame)
    finally:
        collector.remove()
    merge_across_processes(collector, group)
    _check_observed(collector, protocol)
    summary: dict[str, Any] = {"out": str(out), "notes": notes, "records": len(prompts.prompts),
                               "layout": protocol.layout, "pipeline": protocol.pipeline_class,
                               "processes": group.world_size,
                               "layers": len(collector.observations), "components": {}}
    for component, plan in plans.items():
        observed = [o for o in collector.layers() if o.component == component]
        summary["components"][component] = {"layers": len(observed), "calls": observed[0].calls if observed else 0,
                                            "tokens_per_layer_max": max((o.sketch.tokens for o in observed), default=0)}
    if group.is_main:
        binding = _base_binding(base)
        header = write_stats(out, grid, protocol, prompts.to_dict(), binding, holdout_rows, collector.layers())
        summary["stats_bytes"] = out.stat().st_size
        summary["sketch"] = header["sketch"]
        summary["base_fingerprint"] = binding["fingerprint"]
    finish(group)
    summary["seconds"] = round(time.monotonic() - started, 3)
    return summary


def _run_records(pipe: Any, collector: ActivationCollector, prompts: tuple[str, ...], records: list[int],
                 protocol: CalibrationProtocol, group: ProcessGroup, progress: bool, image: Any = None) -> None:
    """Run the pipeline once per record in ``records`` (global indices), observed by ``collector``.

    ``image`` is the first frame (None for text to video: the pipeline then gets no ``image``).
    """
    from tqdm.auto import tqdm

    conditioning = {} if image is None else {"image": image}
    if pipe.config.boundary_ratio is not None:
        conditioning["guidance_scale_2"] = protocol.guidance_2
    bar = tqdm(total=len(records) * protocol.steps, desc="calibrate", unit="step",
               disable=not (progress and group.is_main))

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        bar.update(1)
        return {}

    try:
        for index in records:
            collector.begin_record(index)
            generator = torch.Generator("cpu").manual_seed(protocol.seed + index)
            bar.set_postfix_str(f"prompt {index + 1}/{len(prompts)}")
            pipe(prompt=prompts[index], negative_prompt=protocol.negative_prompt,
                 height=protocol.height, width=protocol.width, num_frames=protocol.frames,
                 num_inference_steps=protocol.steps, guidance_scale=protocol.guidance, **conditioning,
                 generator=generator, output_type="latent", max_sequence_length=protocol.max_sequence_length,
                 callback_on_step_end=on_step_end)
    finally:
        bar.close()


def _check_observed(collector: ActivationCollector, protocol: CalibrationProtocol) -> None:
    """Raise ``CalibrationError`` naming the first target layer that never ran."""
    for observation in collector.layers():
        if observation.sketch.tokens == 0:
            raise CalibrationError(
                f"{observation.component}/{observation.module} never ran during calibration "
                f"({protocol.steps} steps); with boundary_ratio switching experts, use more --steps so that "
                f"both experts run")
