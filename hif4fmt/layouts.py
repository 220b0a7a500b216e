"""Which member of the Wan family a base folder is: its layout name, pipeline class and transformers.

Why this module exists: one state format serves every Wan checkpoint in diffusers, but the pipeline
that calibrates and runs a base, the experts it has and what conditions it (text only, an image, a
CLIP image embedding) differ per model. A state records the layout of the base it was built for
(spec/state-v1.md ``base.layout``), so a state offered to a base of another layout is refused with a
message naming both, and calibration and the runtime pick their protocol from the same description.
Torch-free: it reads ``model_index.json`` and the transformers' ``config.json`` only.

Recognition is structural (what a pipeline needs), not by size: Wan2.1-T2V-1.3B and -14B share the
layout ``wan2.1-t2v-14b``, and a tiny random-weight replica of a model has that model's layout.
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


LAYOUTS: tuple[Layout, ...] = (
    Layout("wan2.2-i2v-a14b", "WanImageToVideoPipeline", ("transformer", "transformer_2"), 36, False, False,
           "Wan2.2-I2V-A14B: image to video, high- and low-noise experts"),
    Layout("wan2.2-t2v-a14b", "WanPipeline", ("transformer", "transformer_2"), 16, False, False,
           "Wan2.2-T2V-A14B: text to video, high- and low-noise experts"),
    Layout("wan2.2-ti2v-5b", "WanPipeline", ("transformer",), 48, False, True,
           "Wan2.2-TI2V-5B: text (or text + image) to video, one transformer, 48-channel Wan2.2 VAE"),
    Layout("wan2.1-t2v-14b", "WanPipeline", ("transformer",), 16, False, False,
           "Wan2.1-T2V-14B and -1.3B: text to video, one transformer"),
    Layout("wan2.1-i2v-14b", "WanImageToVideoPipeline", ("transformer",), 36, True, False,
           "Wan2.1-I2V-14B (480p/720p): image to video with a CLIP image encoder, one transformer"),
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
