"""Write a random-weight look-alike of a Wan checkpoint in diffusers layout, small enough for CPU tests.

Why this tool exists: every end-to-end path of the project (calibrate, build, verify, the W4A4 runtime,
the demo) needs a real diffusers Wan pipeline folder, and the real checkpoints (2 x 14B) cannot be
downloaded in tests. This writes the same layout with the same module names, offline and from a seed.
``--layout`` picks the model (``hif4fmt.layouts.LAYOUTS``); the default, ``wan2.2-i2v-a14b``, is:

    model_index.json            WanImageToVideoPipeline, boundary_ratio 0.9 (Wan2.2 I2V A14B's value)
    transformer/                WanTransformer3DModel, high-noise expert  (BF16 safetensors)
    transformer_2/              WanTransformer3DModel, low-noise expert   (BF16, different weights)
    vae/                        AutoencoderKLWan (z_dim 16, tiny base_dim; float32 like the real VAE)
    text_encoder/               UMT5EncoderModel (d_model 64; BF16 like the real one)
    tokenizer/                  a ``tokenizers`` WordLevel vocabulary in PreTrainedTokenizerFast
    scheduler/                  UniPCMultistepScheduler with Wan's flow settings (flow_shift 5.0)
    image_encoder, image_processor: None (Wan2.2 I2V A14B has no CLIP image encoder; image_dim=None)

The other layouts, as the official diffusers conversion (scripts/convert_wan_to_diffusers.py) writes them:

    wan2.2-t2v-a14b   WanPipeline, two experts, boundary_ratio 0.875, in_channels 16, flow_shift 3.0
    wan2.2-ti2v-5b    WanPipeline, one transformer, expand_timesteps, in/out_channels 48, the Wan2.2 VAE
                      (z_dim 48, is_residual, patch_size 2, 12 in/out channels, spatial stride 16), flow_shift 5.0
    wan2.1-t2v-14b    WanPipeline, one transformer, in_channels 16, flow_shift 3.0
    wan2.1-i2v-14b    WanImageToVideoPipeline, one transformer with image_dim and added_kv_proj_dim (the
                      CLIP image context: attn2.add_k_proj / add_v_proj in every block), a tiny
                      CLIPVisionModel + CLIPImageProcessor, flow_shift 3.0

Transformer dimensions are multiples of the HiF4 unit (64) so that every quantized linear has whole
units, as in the real model (inner 5120, ffn 13824). ``in_channels`` is 36 = 16 noisy latent + 4 mask +
16 image-condition latent channels, ``out_channels`` 16, exactly as in Wan2.2 I2V.

``--medium`` writes the benchmark size (10 blocks, inner dim 768, ffn 3072: ~190 MB BF16 per expert).
Deterministic: the same seed writes byte-identical files (checked by tests/test_tiny_model.py).
``write_synthetic_state`` writes a .hif4 state with synthetic (uncalibrated) masks for such a folder,
for tests and benchmarks of the runtime that must not depend on ``hif4fmt calibrate``/``build``.

``--outliers`` plants synthetic activation outliers that leave the BF16 function unchanged up to rounding
(``tools/plant_outliers.py``: massive input channels and rare text-token spikes, docs/calibration.md).

    python tools/make_tiny_wan.py OUT_DIR [--layout NAME] [--seed N] [--medium] [--outliers]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Wan2.2-I2V-A14B facts (model_index.json and scheduler_config.json of the diffusers release).
WAN22_I2V_BOUNDARY_RATIO = 0.9  # switch to transformer_2 once t < 0.9 * num_train_timesteps
WAN22_I2V_FLOW_SHIFT = 5.0      # UniPC flow_shift used for 480p/720p I2V
WAN22_T2V_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B (convert_wan_to_diffusers.py)
WAN21_FLOW_SHIFT = 3.0          # the conversion's UniPC flow_shift for Wan2.1 and Wan2.2-T2V
WAN22_TI2V_FLOW_SHIFT = 5.0     # ... and for Wan2.2-TI2V-5B
LATENT_CHANNELS = 16            # Wan VAE z_dim
MASK_CHANNELS = 4               # first-frame mask, one channel per temporal VAE stride step
I2V_IN_CHANNELS = LATENT_CHANNELS + MASK_CHANNELS + LATENT_CHANNELS  # 36: noisy + mask + image latents
WAN22_VAE_Z_DIM = 48            # Wan2.2 VAE (TI2V-5B): 48 latent channels = transformer in/out channels
WAN22_VAE_PATCH = 2             # it patchifies pixels 2 x 2 first: 3 * 2 * 2 = 12 VAE in/out channels
WAN22_VAE_SPATIAL_STRIDE = 16   # 2 (patch) x 8 (convolutions)
# Wan2.2 VAE latent normalisation (vae22_diffusers_config of convert_wan_to_diffusers.py)
WAN22_VAE_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_VAE_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
DEFAULT_LAYOUT = "wan2.2-i2v-a14b"

# Offline tokenizer: ids 0..2 are the special tokens, in the order T5 uses (pad 0, eos 1, unk 2).
SPECIAL_TOKENS = ("<pad>", "</s>", "[UNK]")
WORDS = (
    "a an the of in on at with and or to from by over under near into across through while is are "
    "cat dog bird horse fish person man woman child car boat train plane robot dragon tree flower "
    "river lake sea ocean beach mountain forest city street road sky cloud rain snow sun moon star "
    "light fire water wind smoke dust night day morning evening red blue green yellow white black "
    "golden silver small large tiny huge old young slow fast quiet loud bright dark warm cold soft "
    "walks runs flies swims jumps dances sits stands turns looks smiles waves falls rises glows "
    "camera pan zoom close up wide shot view scene slowly quickly gently video cinematic realistic "
    "style background foreground motion moving static detailed high quality frame"
).split()


@dataclass(frozen=True)
class TinyWanSize:
    """Transformer dimensions of one preset (inner dim = heads * head_dim)."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    freq_dim: int
    text_d_model: int


TINY = TinyWanSize(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, freq_dim=256,
                   text_d_model=64)           # inner 64: ~0.2 MB per expert
MEDIUM = TinyWanSize(num_layers=10, num_attention_heads=8, attention_head_dim=96, ffn_dim=3072, freq_dim=256,
                     text_d_model=64)         # inner 768: ~190 MB BF16 per expert
VAE_BASE_DIM = 8                              # real Wan VAE: 96
BLOCK_LINEAR_ROLES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")  # quantized per block
TEXT_NUM_LAYERS = 2
TEXT_NUM_HEADS = 4
TEXT_D_FF = 128
SEED_STRIDE = {"transformer": 0, "transformer_2": 1, "vae": 2, "text_encoder": 3}  # per-component seed offset
IMAGE_ENCODER_SEED_BASE = 1 << 32  # CLIP seed = this + seed: apart from every seed * 4 + offset above
CLIP_IMAGE_SIZE = 32    # tiny CLIP: 32 x 32 pixels in 16 x 16 patches -> 4 + 1 tokens (real: 224 / 14 -> 257)
CLIP_PATCH_SIZE = 16
CLIP_NUM_LAYERS = 2
CLIP_NUM_HEADS = 2
CLIP_INTERMEDIATE = 128


@dataclass(frozen=True)
class TinyLayout:
    """What one ``--layout`` writes: pipeline class, experts, transformer channels, VAE, image encoder."""

    pipeline: str
    experts: tuple[str, ...]
    in_channels: int
    out_channels: int
    boundary_ratio: float | None
    expand_timesteps: bool
    wan22_vae: bool       # the 48-channel Wan2.2 VAE (else the 16-channel Wan2.1 VAE)
    clip_image: bool      # image_dim + added_kv_proj_dim, with a CLIP image encoder
    flow_shift: float


TINY_LAYOUTS = {
    "wan2.2-i2v-a14b": TinyLayout("WanImageToVideoPipeline", ("transformer", "transformer_2"), I2V_IN_CHANNELS,
                                  LATENT_CHANNELS, WAN22_I2V_BOUNDARY_RATIO, False, False, False, WAN22_I2V_FLOW_SHIFT),
    "wan2.2-t2v-a14b": TinyLayout("WanPipeline", ("transformer", "transformer_2"), LATENT_CHANNELS, LATENT_CHANNELS,
                                  WAN22_T2V_BOUNDARY_RATIO, False, False, False, WAN21_FLOW_SHIFT),
    "wan2.2-ti2v-5b": TinyLayout("WanPipeline", ("transformer",), WAN22_VAE_Z_DIM, WAN22_VAE_Z_DIM, None, True, True,
                                 False, WAN22_TI2V_FLOW_SHIFT),
    "wan2.1-t2v-14b": TinyLayout("WanPipeline", ("transformer",), LATENT_CHANNELS, LATENT_CHANNELS, None, False,
                                 False, False, WAN21_FLOW_SHIFT),
    "wan2.1-i2v-14b": TinyLayout("WanImageToVideoPipeline", ("transformer",), I2V_IN_CHANNELS, LATENT_CHANNELS, None,
                                 False, False, True, WAN21_FLOW_SHIFT),
}


def _tokenizer():
    """Return a PreTrainedTokenizerFast over a fixed WordLevel vocabulary (lowercased, eos appended)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="<pad>",
                                   eos_token="</s>", model_max_length=512)


def make_tiny_wan(out_dir: str | Path, seed: int = 0, medium: bool = False, outliers: bool = False,
                  layout: str = DEFAULT_LAYOUT) -> Path:
    """Write the random-weight pipeline folder of ``layout`` to ``out_dir`` and return it as a Path.

    ``seed`` fixes every weight; ``medium`` selects the benchmark size (10 layers, inner dim 768);
    ``layout`` is a name of TINY_LAYOUTS (``hif4fmt.layouts.LAYOUT_NAMES``);
    ``outliers`` rewrites every expert with planted activation outliers (``tools.plant_outliers``, seeded
    by ``seed``), the same BF16 function up to rounding.
    """
    if layout not in TINY_LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(TINY_LAYOUTS)}")
    with _quiet_libraries():
        folder = _write_pipeline(Path(out_dir), seed, MEDIUM if medium else TINY, TINY_LAYOUTS[layout])
    if outliers:
        try:
            from tools.plant_outliers import plant_outliers_in_folder
        except ModuleNotFoundError:  # run as a script: tools/ itself is on sys.path
            from plant_outliers import plant_outliers_in_folder

        plant_outliers_in_folder(folder, seed=seed)
    return folder


def _vae(spec: TinyLayout):
    """Return the tiny AutoencoderKLWan of ``spec``: the Wan2.1 VAE (z_dim 16) or the Wan2.2 VAE (z_dim 48)."""
    from diffusers import AutoencoderKLWan

    if not spec.wan22_vae:
        return AutoencoderKLWan(base_dim=VAE_BASE_DIM, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                attn_scales=[], temperal_downsample=[False, True, True]).eval()
    pixels = 3 * WAN22_VAE_PATCH * WAN22_VAE_PATCH
    return AutoencoderKLWan(base_dim=VAE_BASE_DIM, decoder_base_dim=2 * VAE_BASE_DIM, z_dim=WAN22_VAE_Z_DIM,
                            dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=pixels,
                            out_channels=pixels, patch_size=WAN22_VAE_PATCH, scale_factor_temporal=4,
                            scale_factor_spatial=WAN22_VAE_SPATIAL_STRIDE, latents_mean=list(WAN22_VAE_LATENTS_MEAN),
                            latents_std=list(WAN22_VAE_LATENTS_STD)).eval()


def _clip_image_encoder(seed: int, hidden_size: int):
    """Return (tiny CLIPVisionModel in BF16, its CLIPImageProcessor), built offline from ``seed``."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(IMAGE_ENCODER_SEED_BASE + seed)
    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=CLIP_INTERMEDIATE, num_hidden_layers=CLIP_NUM_LAYERS,
        num_attention_heads=CLIP_NUM_HEADS, image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH_SIZE,
        projection_dim=hidden_size)).to(torch.bfloat16).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                   crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
    return encoder, processor


def _write_pipeline(out_dir: Path, seed: int, size: TinyWanSize, spec: TinyLayout) -> Path:
    """Build every component from ``seed`` at ``size`` for ``spec`` and save the pipeline to ``out_dir``."""
    import diffusers
    import torch
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    inner = size.num_attention_heads * size.attention_head_dim

    def transformer(component: str) -> WanTransformer3DModel:
        torch.manual_seed(seed * len(SEED_STRIDE) + SEED_STRIDE[component])
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=size.num_attention_heads,
            attention_head_dim=size.attention_head_dim, in_channels=spec.in_channels, out_channels=spec.out_channels,
            text_dim=size.text_d_model, freq_dim=size.freq_dim, ffn_dim=size.ffn_dim, num_layers=size.num_layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            image_dim=inner if spec.clip_image else None, added_kv_proj_dim=inner if spec.clip_image else None,
            rope_max_seq_len=1024,
        )
        return model.to(torch.bfloat16).eval()

    torch.manual_seed(seed * len(SEED_STRIDE) + SEED_STRIDE["vae"])
    vae = _vae(spec)
    torch.manual_seed(seed * len(SEED_STRIDE) + SEED_STRIDE["text_encoder"])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=size.text_d_model, d_kv=size.text_d_model // TEXT_NUM_HEADS,
        d_ff=TEXT_D_FF, num_layers=TEXT_NUM_LAYERS, num_heads=TEXT_NUM_HEADS, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )).to(torch.bfloat16).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=spec.flow_shift, num_train_timesteps=1000)
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler,
             "transformer": transformer("transformer"),
             "transformer_2": transformer("transformer_2") if "transformer_2" in spec.experts else None,
             "boundary_ratio": spec.boundary_ratio, "expand_timesteps": spec.expand_timesteps}
    if spec.pipeline == "WanImageToVideoPipeline":
        parts["image_encoder"], parts["image_processor"] = _clip_image_encoder(seed, inner) if spec.clip_image \
            else (None, None)
    pipe = getattr(diffusers, spec.pipeline)(**parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@contextmanager
def _quiet_libraries():
    """Silence diffusers/transformers notices and progress bars while inside; restore what was set."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, (verbosity, bars) in zip(libraries, saved):
            library.set_verbosity(verbosity)
            if bars:
                library.enable_progress_bar()


def write_synthetic_state(base_dir: str | Path, path: str | Path, seed: int = 0) -> Path:
    """Write a .hif4 state quantizing every block linear of ``base_dir`` with synthetic masks; return ``path``.

    Not calibrated: m_i = sqrt(max_o |W[o, i]|) * U(0.5, 2) (seeded), positive and channel dependent, so
    tests and benchmarks exercise the x * m and W / m scalings without running ``hif4fmt calibrate``.
    Bound to ``base_dir`` by its real fingerprint; ``proj_out`` is listed as an excluded boundary layer.
    """
    import numpy as np

    from hif4fmt.base import BaseCheckpoint
    from hif4fmt.fingerprint import fingerprint_base
    from hif4fmt.layouts import describe_layout
    from hif4fmt.recipe import Recipe
    from hif4fmt.state import BaseBinding, ExcludedLayer, QuantizedLayer, State, write_state

    fingerprint = fingerprint_base(base_dir)
    rng = np.random.default_rng(seed)
    layers, excluded = [], []
    with BaseCheckpoint.open(base_dir) as base:
        binding = BaseBinding.from_fingerprint(fingerprint, base=base, layout=describe_layout(base_dir))
        for component_name, component in sorted(base.components.items()):
            for tensor in component.tensor_names():
                module = tensor[: -len(".weight")]
                if not (tensor.endswith(".weight") and module.startswith("blocks.")
                        and module.split(".", 2)[-1] in BLOCK_LINEAR_ROLES):
                    continue
                weight = component.read_tensor_numpy(tensor)
                mask = np.sqrt(np.abs(weight).max(axis=0)) * rng.uniform(0.5, 2.0, weight.shape[1])
                layers.append(QuantizedLayer(component_name, module, weight.shape[1], weight.shape[0],
                                             mask.astype(np.float32), fingerprint.components[component_name].tensors[tensor]))
            excluded.append(ExcludedLayer(component_name, "proj_out", "boundary layer"))
    write_state(path, State(Recipe(), {"synthetic_masks": "sqrt(max|W|) * U(0.5, 2)", "seed": seed},
                            binding, tuple(layers), tuple(excluded)))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--medium", action="store_true", help="benchmark size: 10 layers, inner dim 768")
    parser.add_argument("--outliers", action="store_true",
                        help="plant synthetic activation outliers (same BF16 function; tools/plant_outliers.py)")
    parser.add_argument("--layout", choices=sorted(TINY_LAYOUTS), default=DEFAULT_LAYOUT,
                        help=f"which Wan model to imitate (default {DEFAULT_LAYOUT})")
    args = parser.parse_args(argv)
    path = make_tiny_wan(args.out_dir, seed=args.seed, medium=args.medium, outliers=args.outliers,
                         layout=args.layout)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
