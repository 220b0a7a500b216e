"""The calibration protocol: one validated, frozen record of how the pipeline is run to collect statistics.

Why this module exists: the statistics are only meaningful together with the generation protocol
that produced them (resolution, frames, steps, guidance, seeds, the placeholder image), so the
protocol is one object that the CLI fills, the runner obeys, and the statistics file and the .hif4
state record verbatim. Defaults are the paper's Wan2.2-I2V-A14B protocol (spec 2.2).
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
SEED_RULE = "record i uses a CPU torch.Generator seeded with seed + i (i = global prompt index)"
IMAGE_RULE = "blank RGB image of width x height, every channel = image_fill"
OBSERVED = "every denoising step, both CFG branches (cond and uncond), both experts"
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

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        """Return the protocol as plain JSON types plus the fixed rules it implies (spec 2.2, 5.2.3)."""
        data = asdict(self)
        data["guidance"] = float(self.guidance)
        data["guidance_2"] = None if self.guidance_2 is None else float(self.guidance_2)
        data.update({"seed_rule": SEED_RULE, "image": IMAGE_RULE, "observed": OBSERVED,
                     "pipeline": "diffusers.WanImageToVideoPipeline"})
        return data

    @classmethod
    def from_dict(cls, data: Any, error: type[Hif4Error] = CalibrationError) -> "CalibrationProtocol":
        """Rebuild a protocol from ``to_dict`` output; missing or invalid fields raise ``error``."""
        if not isinstance(data, dict):
            raise error(f"protocol: expected a map, found {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise error(f"protocol: missing fields {missing}")
        try:
            return cls(**{name: data[name] for name in names})
        except CalibrationError as exc:
            raise error(str(exc)) from None
