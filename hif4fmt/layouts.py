"""Which member of the Wan family a base folder is: its layout name, pipeline class and transformers.

Why this module exists: one state format serves every Wan checkpoint in diffusers, but the pipeline
that calibrates and runs a base, the experts it has and what conditions it (text only, an image, a
CLIP image embedding) differ per model. A state records the layout of the base it was built for
(spec/state-v1.md ``base.layout``), so a state offered to a base of another layout is refused with a
message naming both, and calibration and the runtime pick their protocol from the same description.
Torch-free: it reads ``model_index.json`` and the transformers' ``config.json`` only.

Recognition is structural (what a pipeline needs), not by size: Wan2.1-T2V-1.3B and -14B share the
layout ``wan2.1-t2v-14b``, and a tiny random-weight replica of a model has that model's layout.

Each row also carries what running that model takes (``image``: whether it needs, accepts or refuses
a first-frame image) and its release's recommended generation settings (``GenerationDefaults``);
``pipeline_profile`` joins them with what the base folder itself says (``boundary_ratio`` and
``expand_timesteps`` from ``model_index.json``, ``flow_shift`` from the scheduler config, the VAE's
spatial stride), so calibration and the runtime take their defaults from the model, not from A14B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hif4fmt.constants import COMPONENT_CONFIG_NAME, MAX_INDEX_BYTES, MODEL_INDEX_NAME
from hif4fmt.errors import BaseCheckpointError
from hif4fmt.jsonfile import load_json_file
from hif4fmt.recipe import COMPONENTS

UNKNOWN_LAYOUT = "unknown"  # name recorded for a folder that matches no row of LAYOUTS
TRANSFORMER_CLASS = "WanTransformer3DModel"
TEXT_TO_VIDEO_PIPELINE = "WanPipeline"
IMAGE_TO_VIDEO_PIPELINE = "WanImageToVideoPipeline"

# Layout.image: what a first-frame image is to the model
IMAGE_NONE = "none"          # text to video: an image is refused
IMAGE_OPTIONAL = "optional"  # Wan2.2-TI2V: text only (WanPipeline) or text + image (WanImageToVideoPipeline)
IMAGE_REQUIRED = "required"  # image to video: without a file, the explicit blank placeholder image
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
VAE_CONFIG = "vae/config.json"
IMAGE_EMBEDDING_TEXT_TOKENS = 512  # diffusers' Wan attention splits [image | text] context at text length 512
DIFFUSERS_VAE_SPATIAL_STRIDE = 8  # AutoencoderKLWan's scale_factor_spatial when its config omits it (Wan2.1 VAE)


@dataclass(frozen=True)
class GenerationDefaults:
    """A model release's recommended settings: pixels, frames (4 k + 1), steps, CFG scales, frames per second.

    ``guidance_2`` is the low-noise expert's scale (None: ``guidance``; always None with one transformer).
    Values are those of the official Wan repositories' configs for each task (``sample_guide_scale``,
    ``frame_num``, ``sample_steps``, ``sample_fps``) at the 480p size (704 x 1280 for TI2V-5B, which is
    trained at 720p only).
    """

    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    guidance_2: float | None
    fps: float


@dataclass(frozen=True)
class Layout:
    """One Wan layout: the structural facts that tell it apart, as they appear in a diffusers folder.

    ``in_channels`` is the transformer's input channels (latents, plus mask and image latents for I2V);
    ``image_embedding`` whether the transformer takes a CLIP image embedding (``image_dim`` set, with
    ``attn2.add_k_proj/add_v_proj`` in every block); ``expand_timesteps`` Wan2.2-TI2V's per-token timesteps.
    """

    name: str
    pipeline: str
    transformers: tuple[str, ...]
    in_channels: int
    image_embedding: bool
    expand_timesteps: bool
    description: str
    image: str = IMAGE_REQUIRED
    defaults: GenerationDefaults = GenerationDefaults(480, 832, 81, 40, 3.5, None, 16.0)


LAYOUTS: tuple[Layout, ...] = (
    Layout("wan2.2-i2v-a14b", "WanImageToVideoPipeline", ("transformer", "transformer_2"), 36, False, False,
           "Wan2.2-I2V-A14B: image to video, high- and low-noise experts",
           IMAGE_REQUIRED, GenerationDefaults(480, 832, 81, 40, 3.5, None, 16.0)),
    Layout("wan2.2-t2v-a14b", "WanPipeline", ("transformer", "transformer_2"), 16, False, False,
           "Wan2.2-T2V-A14B: text to video, high- and low-noise experts",
           IMAGE_NONE, GenerationDefaults(480, 832, 81, 40, 4.0, 3.0, 16.0)),
    Layout("wan2.2-ti2v-5b", "WanPipeline", ("transformer",), 48, False, True,
           "Wan2.2-TI2V-5B: text (or text + image) to video, one transformer, 48-channel Wan2.2 VAE",
           IMAGE_OPTIONAL, GenerationDefaults(704, 1280, 121, 50, 5.0, None, 24.0)),
    Layout("wan2.1-t2v-14b", "WanPipeline", ("transformer",), 16, False, False,
           "Wan2.1-T2V-14B and -1.3B: text to video, one transformer",
           IMAGE_NONE, GenerationDefaults(480, 832, 81, 50, 5.0, None, 16.0)),
    Layout("wan2.1-i2v-14b", "WanImageToVideoPipeline", ("transformer",), 36, True, False,
           "Wan2.1-I2V-14B (480p/720p): image to video with a CLIP image encoder, one transformer",
           IMAGE_REQUIRED, GenerationDefaults(480, 832, 81, 40, 5.0, None, 16.0)),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def layout_by_name(name: str) -> Layout:
    """Return the row of LAYOUTS called ``name``; ``ValueError`` listing the names otherwise."""
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise ValueError(f"unknown Wan layout {name!r}; known: {', '.join(LAYOUT_NAMES)}")


def _declared(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def describe_layout(base_dir: str | Path) -> dict[str, Any]:
    """Return ``{"name", "pipeline", "transformers"}`` of the diffusers folder ``base_dir``.

    ``name`` is a row of LAYOUTS, or "unknown" when the folder matches none (then ``pipeline`` is the
    ``_class_name`` it declares). A single transformer folder (``config.json``, no ``model_index.json``)
    is described as pipeline "none". Raises ``BaseCheckpointError`` for an unreadable index or config.
    """
    base_dir = Path(base_dir)
    index_path = base_dir / MODEL_INDEX_NAME
    if not index_path.is_file():
        return {"name": UNKNOWN_LAYOUT, "pipeline": "none", "transformers": [COMPONENTS[0]]}
    index = load_json_file(index_path, "model_index.json", MAX_INDEX_BYTES, BaseCheckpointError)
    if not isinstance(index, dict):
        raise BaseCheckpointError(f"{index_path}: expected a JSON object")
    pipeline = index.get("_class_name")
    pipeline = pipeline if isinstance(pipeline, str) and pipeline else "none"
    transformers = [name for name in COMPONENTS
                    if _declared(index.get(name)) and index[name][1] == TRANSFORMER_CLASS]
    found = {"name": UNKNOWN_LAYOUT, "pipeline": pipeline, "transformers": transformers}
    if not transformers:
        return found
    config_path = base_dir / transformers[0] / COMPONENT_CONFIG_NAME
    if not config_path.is_file():
        return found
    config = load_json_file(config_path, "transformer config", MAX_INDEX_BYTES, BaseCheckpointError)
    if not isinstance(config, dict):
        raise BaseCheckpointError(f"{config_path}: expected a JSON object")
    in_channels = config.get("in_channels")
    image_embedding = config.get("image_dim") is not None
    expand_timesteps = index.get("expand_timesteps") is True
    for layout in LAYOUTS:
        if (layout.pipeline == pipeline and layout.transformers == tuple(transformers)
                and layout.in_channels == in_channels and layout.image_embedding == image_embedding
                and layout.expand_timesteps == expand_timesteps):
            found["name"] = layout.name
            break
    return found


def layout_label(layout: dict[str, Any] | None) -> str:
    """Return a one-line description of a layout dict for messages: ``wan2.2-t2v-a14b (WanPipeline, ...)``."""
    if not layout:
        return "an unrecorded layout"
    experts = "+".join(layout.get("transformers", [])) or "no transformer"
    return f"{layout.get('name', UNKNOWN_LAYOUT)} ({layout.get('pipeline', 'none')}, {experts})"


@dataclass(frozen=True)
class PipelineProfile:
    """How a base folder is run: its layout, the diffusers pipeline and its calling facts, its defaults.

    ``pipeline`` is the class named by ``model_index.json``; with an image, a WanPipeline base that
    accepts one (TI2V) runs as ``image_pipeline`` (WanImageToVideoPipeline over the same components).
    ``spatial_multiple`` is the VAE's spatial stride x the patch size: height and width must be multiples.
    """

    layout: Layout
    pipeline: str
    transformers: tuple[str, ...]
    boundary_ratio: float | None
    expand_timesteps: bool
    image_encoder: bool
    flow_shift: float | None
    spatial_multiple: int

    @property
    def name(self) -> str:
        return self.layout.name

    def pipeline_for(self, with_image: bool) -> str:
        """Return the diffusers class that runs this base with or without a first-frame image."""
        return IMAGE_TO_VIDEO_PIPELINE if with_image else self.pipeline

    def image_problem(self, with_image: bool, option: str = "--image") -> str | None:
        """Return why ``option`` cannot be given (or must be) for this model, or None when it is fine."""
        if with_image and self.layout.image == IMAGE_NONE:
            return (f"{option}: {self.layout.name} is a text-to-video model ({self.pipeline}); it takes no image, "
                    f"drop {option}")
        return None

    def text_length_problem(self, max_sequence_length: int, option: str = "--max-sequence-length") -> str | None:
        """Return why ``max_sequence_length`` cannot run this model, or None.

        A transformer with a CLIP image embedding (Wan2.1-I2V) splits its cross-attention context into
        image and text tokens assuming exactly IMAGE_EMBEDDING_TEXT_TOKENS text tokens (diffusers'
        WanAttnProcessor); any other length would feed ``add_k_proj``/``add_v_proj`` the wrong tokens.
        """
        if self.layout.image_embedding and max_sequence_length != IMAGE_EMBEDDING_TEXT_TOKENS:
            return (f"{option} {max_sequence_length}: {self.layout.name} needs {IMAGE_EMBEDDING_TEXT_TOKENS} text "
                    f"tokens (diffusers splits the image and text context at {IMAGE_EMBEDDING_TEXT_TOKENS}); "
                    f"use {IMAGE_EMBEDDING_TEXT_TOKENS}")
        return None

    def uses_image(self, with_image: bool) -> bool:
        """Return whether a run feeds a first-frame image (a file, or the blank placeholder for I2V)."""
        return with_image or self.layout.image == IMAGE_REQUIRED


def _optional_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = load_json_file(path, what, MAX_INDEX_BYTES, BaseCheckpointError)
    if not isinstance(data, dict):
        raise BaseCheckpointError(f"{path}: expected a JSON object")
    return data


def pipeline_profile(base_dir: str | Path) -> PipelineProfile:
    """Return the ``PipelineProfile`` of the diffusers folder ``base_dir`` (torch-free).

    Raises ``BaseCheckpointError`` naming the folder when it is not one of the Wan layouts of LAYOUTS
    (no model_index.json, another pipeline class, an unknown combination of transformer facts).
    """
    base_dir = Path(base_dir)
    described = describe_layout(base_dir)
    if described["name"] == UNKNOWN_LAYOUT:
        raise BaseCheckpointError(
            f"{base_dir}: not a known Wan pipeline folder (pipeline {described['pipeline']}, transformers "
            f"{'+'.join(described['transformers']) or 'none'}); supported layouts: {', '.join(LAYOUT_NAMES)}")
    layout = layout_by_name(described["name"])
    index = _optional_json(base_dir / MODEL_INDEX_NAME, "model_index.json")
    scheduler = _optional_json(base_dir / SCHEDULER_CONFIG, "scheduler config")
    vae = _optional_json(base_dir / VAE_CONFIG, "VAE config")
    transformer = _optional_json(base_dir / layout.transformers[0] / COMPONENT_CONFIG_NAME, "transformer config")
    ratio = index.get("boundary_ratio")
    shift = scheduler.get("flow_shift")
    stride = vae.get("scale_factor_spatial", DIFFUSERS_VAE_SPATIAL_STRIDE)
    patch = transformer.get("patch_size") or [1, 2, 2]
    return PipelineProfile(
        layout=layout, pipeline=layout.pipeline, transformers=layout.transformers,
        boundary_ratio=float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None,
        expand_timesteps=index.get("expand_timesteps") is True,
        image_encoder=_declared(index.get("image_encoder")),
        flow_shift=float(shift) if isinstance(shift, (int, float)) and not isinstance(shift, bool) else None,
        spatial_multiple=int(stride) * int(patch[1]))
