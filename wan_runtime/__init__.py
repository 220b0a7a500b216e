"""wan_runtime: run Wan2.2 I2V with HiF4 W4A4 experts rebuilt from a BF16 base and a .hif4 state.

Why this package exists: a .hif4 state holds masks, not weights; this package turns base + state into a
normal diffusers ``WanImageToVideoPipeline`` whose listed linears are ``HiF4Linear`` (packed HiF4
weights, HiF4 activations), renders videos with it and compares them with BF16 (``wan-runtime``).
Modules: ``hif4_linear`` (the layer), ``loader`` (base + state -> pipeline), ``generate`` (one render),
``video`` (MP4/GIF files), ``frame_metrics`` (PSNR/SSIM), ``placeholder`` (default image), ``cli``.
Docs: docs/runtime.md.
"""

from wan_runtime.hif4_linear import HiF4Linear
from wan_runtime.loader import apply_state, load_pipeline, quantized_layers

__all__ = ["HiF4Linear", "apply_state", "load_pipeline", "quantized_layers"]
