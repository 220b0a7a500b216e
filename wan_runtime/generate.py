"""Run a Wan pipeline once (text or image to video) and return its frames as uint8 (T, H, W, 3).

Why this module exists: the CLI, the tests and the benchmarks must render videos the same way (seeded
CPU generator, same argument checks, same conversion to 8-bit), whether the pipeline is BF16 or W4A4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wan_runtime.video import frames_to_uint8

SPATIAL_MULTIPLE = 16  # Wan2.1 VAE stride 8 x patch size 2 (the Wan2.2 VAE of TI2V-5B: 16 x 2 = 32)
TEMPORAL_STRIDE = 4  # VAE temporal stride: frame counts are 4k + 1


@dataclass(frozen=True)
class GenerationSettings:
    """What to render: prompt, size (pixels), frames, denoising steps, CFG scale, seed, text length.

    ``guidance_2`` is the low-noise expert's scale (two-expert models; None: ``guidance``);
    ``spatial_multiple`` what height and width must be multiples of (the model's VAE stride x patch).
    """

    prompt: str
    negative_prompt: str = ""
    height: int = 480
    width: int = 832
    frames: int = 81
    steps: int = 40
    guidance: float = 3.5
    seed: int = 0
    max_sequence_length: int = 512
    guidance_2: float | None = None
    spatial_multiple: int = SPATIAL_MULTIPLE

    def problems(self) -> list[str]:
        """Return what is wrong with the settings (empty when they are valid), each with its fix."""
        found = []
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % self.spatial_multiple:
                found.append(f"{name} {value}: must be a positive multiple of {self.spatial_multiple} for this model "
                             f"(VAE stride x patch size)")
        if self.frames < 1 or (self.frames - 1) % TEMPORAL_STRIDE:
            found.append(f"frames {self.frames}: must be {TEMPORAL_STRIDE}k + 1 (1, 5, 9, ..., 81)")
        if self.steps < 1:
            found.append(f"steps {self.steps}: must be >= 1")
        if self.max_sequence_length < 1:
            found.append(f"max sequence length {self.max_sequence_length}: must be >= 1")
        if self.guidance < 0:
            found.append(f"guidance {self.guidance}: must be >= 0")
        if self.guidance_2 is not None and self.guidance_2 < 0:
            found.append(f"guidance 2 {self.guidance_2}: must be >= 0")
        for name in ("prompt", "negative_prompt"):
            try:
                getattr(self, name).encode("utf-8")
            except UnicodeEncodeError as exc:
                found.append(f"{name.replace('_', ' ')}: character {exc.start} is a lone surrogate (not text); drop it")
        return found


def generate_frames(pipe, image, settings: GenerationSettings) -> np.ndarray:
    """Return the uint8 (frames, height, width, 3) video ``pipe`` makes from ``image`` and ``settings``.

    ``image`` None: text to video (``WanPipeline``); else the first frame, resized to the video size.
    ``settings.guidance_2`` is passed only to a two-expert pipeline (one with ``boundary_ratio``).
    The initial noise comes from a CPU ``torch.Generator`` seeded with ``settings.seed``, so BF16 and
    W4A4 runs (and runs on other devices) start from the same latents.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    conditioning = {} if image is None else {"image": image.resize((settings.width, settings.height))}
    if pipe.config.get("boundary_ratio") is not None and settings.guidance_2 is not None:
        conditioning["guidance_scale_2"] = settings.guidance_2
    with torch.inference_mode():
        output = pipe(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height,
            width=settings.width, num_frames=settings.frames, num_inference_steps=settings.steps,
            guidance_scale=settings.guidance, generator=generator, max_sequence_length=settings.max_sequence_length,
            output_type="np", **conditioning,
        )
    return frames_to_uint8(np.asarray(output.frames[0]))
