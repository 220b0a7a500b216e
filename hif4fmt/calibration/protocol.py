"""The calibration protocol: one validated, frozen record of how the pipeline is run to collect statistics.

Why this module exists: the statistics are only meaningful together with the generation protocol
that produced them (resolution, frames, steps, guidance, seeds, the placeholder image), so the
protocol is one object that the CLI fills, the runner obeys, and the statistics file and the .hif4
state record verbatim. Defaults are the paper's Wan2.2-I2V-A14B protocol (spec 2.2); for the other Wan
models ``hif4fmt calibrate`` fills them from the model (``defaults_for``). The protocol also names the
base's layout, the diffusers pipeline class that ran and the experts it has (``hif4fmt.layouts``), and
how the first frame was given: none (text to video), the blank placeholder, or a file (its SHA-256).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from hif4fmt.errors import CalibrationError, Hif4Error

DEFAULT_NUM_PROMPTS = 16
DEFAULT_HEIGHT = 720
DEFAULT_WIDTH = 1280
DEFAULT_FRAMES = 61  # (61 - 1) / 4 + 1 = 16 latent frames
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE = 3.5  # Wan2.2 I2V guidance for both experts
DEFAULT_SEED = 42
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens, Wan's default (prompt embeddings are zero-padded to it)
DEFAULT_NEGATIVE_PROMPT = ""  # the diffusers pipeline's default unconditional prompt
DEFAULT_IMAGE_FILL = 0  # the blank placeholder image: every RGB channel of every pixel = 0 (black)
DEFAULT_DTYPE = "bfloat16"  # transformers and text encoder; the VAE always runs in float32
DEFAULT_LAYOUT = "wan2.2-i2v-a14b"  # the model of the paper's protocol (and of statistics files without the field)
DEFAULT_PIPELINE = "diffusers.WanImageToVideoPipeline"
DEFAULT_EXPERTS = ("transformer", "transformer_2")
PIPELINE_PREFIX = "diffusers."  # protocol.pipeline is "diffusers.<class name>"
PIPELINES = ("diffusers.WanPipeline", "diffusers.WanImageToVideoPipeline")
EXPERT_NAMES = ("transformer", "transformer_2")
IMAGE_SOURCES = ("none", "blank", "file")  # no image (text to video), the placeholder, a file (image_sha256)
SHA256_HEX_DIGITS = 64
# fields added after version 1 of the statistics format: a file without them was written by the
# Wan2.2-I2V-A14B-only calibrator, so they default to its values (spec/stats-v1.md 5.2.3)
LATER_FIELDS = ("layout", "pipeline", "experts", "image_source", "image_sha256")
SEED_RULE = "record i uses a CPU torch.Generator seeded with seed + i (i = global prompt index)"
IMAGE_RULE = "blank RGB image of width x height, every channel = image_fill"
IMAGE_RULES = {"none": "no image (text to video)", "blank": IMAGE_RULE,
               "file": "the RGB image file with SHA-256 image_sha256, resized to width x height"}
OBSERVED = "every denoising step, both CFG branches (cond and uncond), every expert"
DTYPES = ("bfloat16", "float16", "float32")
FRAME_STRIDE = 4  # Wan VAE temporal compression: frames must be 4 k + 1
MAX_PIXELS = 4096  # height and width limit
MAX_FRAMES = 1024
MAX_STEPS = 1000
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class CalibrationProtocol:
    """How ``WanImageToVideoPipeline`` is run for calibration (all fields are written into the stats file).

    ``guidance_2`` is the low-noise expert's guidance (None: same as ``guidance``). Guidance must be
    > 1 so that both classifier-free-guidance branches run and are observed.
    """

    num_prompts: int = DEFAULT_NUM_PROMPTS
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    frames: int = DEFAULT_FRAMES
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    guidance_2: float | None = None
    seed: int = DEFAULT_SEED
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    image_fill: int = DEFAULT_IMAGE_FILL
    dtype: str = DEFAULT_DTYPE
    layout: str = DEFAULT_LAYOUT
    pipeline: str = DEFAULT_PIPELINE
    experts: tuple[str, ...] = DEFAULT_EXPERTS
    image_source: str = "blank"
    image_sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts) if isinstance(self.experts, list) else self.experts)
        self.validate()

    def validate(self, error: type[Hif4Error] = CalibrationError) -> None:
        """Raise ``error`` naming the option, the value and the allowed range."""
        for name, value, low, high in (("num_prompts", self.num_prompts, 1, 1 << 19),
                                       ("height", self.height, 16, MAX_PIXELS),
                                       ("width", self.width, 16, MAX_PIXELS),
                                       ("frames", self.frames, 1, MAX_FRAMES),
                                       ("steps", self.steps, 1, MAX_STEPS),
                                       ("seed", self.seed, 0, MAX_SEED),
                                       ("max_sequence_length", self.max_sequence_length, 1, 4096),
                                       ("image_fill", self.image_fill, 0, 255)):
            if type(value) is not int or not low <= value <= high:
                raise error(f"protocol {name} {value!r}: expected an integer in [{low}, {high}]")
        if (self.frames - 1) % FRAME_STRIDE:
            raise error(f"protocol frames {self.frames}: Wan needs 4 k + 1 frames (e.g. 5, 61, 81)")
        for name, value in (("guidance", self.guidance), ("guidance_2", self.guidance_2)):
            if value is None and name == "guidance_2":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
                raise error(f"protocol {name} {value!r}: expected a number > 1 (both classifier-free "
                            f"guidance branches must run to be observed), e.g. {DEFAULT_GUIDANCE}")
        if not isinstance(self.negative_prompt, str):
            raise error(f"protocol negative_prompt {self.negative_prompt!r}: expected a string")
        try:
            self.negative_prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise error(f"protocol negative_prompt: character {exc.start} is a lone surrogate, which is not text; "
                        f"drop it") from None
        if self.dtype not in DTYPES:
            raise error(f"protocol dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not isinstance(self.layout, str) or not self.layout:
            raise error(f"protocol layout {self.layout!r}: expected a layout name, e.g. {DEFAULT_LAYOUT}")
        if self.pipeline not in PIPELINES:
            raise error(f"protocol pipeline {self.pipeline!r}: expected one of {', '.join(PIPELINES)}")
        if (not isinstance(self.experts, tuple) or not self.experts or len(set(self.experts)) != len(self.experts)
                or any(expert not in EXPERT_NAMES for expert in self.experts)):
            raise error(f"protocol experts {self.experts!r}: expected a non-empty list of distinct names from "
                        f"{', '.join(EXPERT_NAMES)}")
        if self.guidance_2 is not None and len(self.experts) < 2:
            raise error(f"protocol guidance_2 {self.guidance_2!r}: the model has one transformer "
                        f"({self.experts[0]}), so there is no low-noise expert to guide; drop --guidance-2")
        if self.image_source not in IMAGE_SOURCES:
            raise error(f"protocol image_source {self.image_source!r}: expected one of {', '.join(IMAGE_SOURCES)}")
        if (self.image_source == "none") != (self.pipeline == "diffusers.WanPipeline"):
            raise error(f"protocol image_source {self.image_source!r} with pipeline {self.pipeline}: "
                        f"WanPipeline runs without an image, WanImageToVideoPipeline with one")
        digest = self.image_sha256
        if (self.image_source == "file") != (digest is not None) or (digest is not None and not (
                isinstance(digest, str) and len(digest) == SHA256_HEX_DIGITS
                and all(c in "0123456789abcdef" for c in digest))):
            raise error(f"protocol image_sha256 {digest!r}: expected 64 lowercase hex digits exactly when "
                        f"image_source is 'file'")

    def to_dict(self) -> dict[str, Any]:
        """Return the protocol as plain JSON types plus the fixed rules it implies (spec 2.2, 5.2.3)."""
        data = asdict(self)
        data["guidance"] = float(self.guidance)
        data["guidance_2"] = None if self.guidance_2 is None else float(self.guidance_2)
        data["experts"] = list(self.experts)
        data.update({"seed_rule": SEED_RULE, "image": IMAGE_RULES[self.image_source], "observed": OBSERVED})
        return data

    @property
    def pipeline_class(self) -> str:
        """Return the diffusers class name that runs this protocol (``WanPipeline`` ...)."""
        return self.pipeline[len(PIPELINE_PREFIX):]

    @classmethod
    def from_dict(cls, data: Any, error: type[Hif4Error] = CalibrationError) -> "CalibrationProtocol":
        """Rebuild a protocol from ``to_dict`` output; missing or invalid fields raise ``error``."""
        if not isinstance(data, dict):
            raise error(f"protocol: expected a map, found {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data and name not in LATER_FIELDS]
        if missing:
            raise error(f"protocol: missing fields {missing}")
        try:
            return cls(**{name: data[name] for name in names if name in data})
        except CalibrationError as exc:
            raise error(str(exc)) from None


def defaults_for(profile: Any) -> dict[str, Any]:
    """Return the calibration defaults of a base's ``hif4fmt.layouts.PipelineProfile``.

    Wan2.2-I2V-A14B keeps the paper's protocol (the module constants); every other model calibrates at
    its release's recommended size, frames and guidance (``Layout.defaults``), with DEFAULT_STEPS steps.
    """
    if profile.name == DEFAULT_LAYOUT:
        return {"height": DEFAULT_HEIGHT, "width": DEFAULT_WIDTH, "frames": DEFAULT_FRAMES, "steps": DEFAULT_STEPS,
                "guidance": DEFAULT_GUIDANCE, "guidance_2": None}
    model = profile.layout.defaults
    return {"height": model.height, "width": model.width, "frames": model.frames, "steps": DEFAULT_STEPS,
            "guidance": model.guidance, "guidance_2": model.guidance_2}
