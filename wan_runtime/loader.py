"""Rebuild a W4A4 Wan pipeline from a BF16 base checkpoint and a .hif4 state.

Why this module exists: a .hif4 state holds only masks, so the quantized model is made at load time:
read the state, check it belongs to this base (fingerprint, docs/runtime.md "Verification"; a state of
another Wan layout is refused naming both layouts), load each transformer expert, and swap every
linear the state lists for a ``HiF4Linear`` one layer at a time. The result is the ordinary diffusers
pipeline the base declares (``WanPipeline`` or ``WanImageToVideoPipeline``, ``hif4fmt.layouts``);
nothing else in it changes (boundary linears, norms, the patch embedding, the VAE, the text and image
encoders stay as loaded).
LoRAs (``loras=`` / ``loras_2=``) are merged into each BF16 expert by ``wan_runtime.lora`` after the
state is verified against the unmodified base and before the expert is packed.

Memory: experts are loaded and quantized one after the other. An expert's target weights are encoded
(on the CPU with the compiled kernel: all in one call, over all cores), then each linear is swapped
and its BF16 weight dropped, then the rest of the expert is copied out of the file mapping. At no
time are two copies of an expert resident: the peak is one BF16 expert plus the packed weights
(0.28x of it) of the experts done so far (measured by benchmarks/runtime_apply.py).

Speed: the whole load runs with Python's cyclic garbage collector paused (``collector_paused``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hif4fmt.base import BaseCheckpoint
from hif4fmt.errors import BaseCheckpointError, BaseMismatchError, CodecError, RuntimeLoadError
from hif4fmt.fingerprint import fingerprint_checkpoint
from hif4fmt.hifloat4 import quantize_divided_many
from hif4fmt.recipe import COMPONENTS
from hif4fmt.state import State, read_state
from hif4fmt.verify import compare_with_base
from wan_runtime.hif4_linear import HiF4Linear, check_rotation, pack_weight, resolve_arithmetic, rounded_mask
from wan_runtime.lora import LoraSpec, check_lora_files, lora_specs, merge_loras_

MODEL_INDEX = "model_index.json"  # marks a diffusers pipeline folder
TRIM_EVERY_BYTES = 64 * 1024 * 1024  # hand freed heap back to the OS after each 64 MiB of weights quantized
VAE_DTYPE = torch.float32  # the Wan VAE runs in float32, as in the official Wan2.2 diffusers examples


@dataclass(frozen=True)
class QuantizedComponent:
    """What ``quantize_transformer_`` did to one expert: layer count and weight bytes before and after."""

    component: str
    layers: int
    bf16_weight_bytes: int  # bytes the replaced linears' weights held in their original dtype
    packed_weight_bytes: int  # bytes their packed HiF4 weights hold (codes + metadata)
    arithmetic: str = "simulated"  # how the layers compute: "integer" or "simulated" (HiF4Linear)


def read_bound_state(base_dir: str | os.PathLike, state_path: str | os.PathLike, verify: bool = True) -> State:
    """Return the state at ``state_path`` (masks loaded, checksums checked), verified against the base.

    With ``verify`` the base is fingerprinted and a mismatch raises ``BaseMismatchError`` (exit code 1)
    carrying ``hif4fmt verify``'s message; ``verify=False`` skips that check (explicit opt-out).
    """
    state = read_state(state_path)
    if verify:
        with BaseCheckpoint.open(base_dir) as base:
            report = compare_with_base(state, base, fingerprint_checkpoint(base), str(state_path))
        if not report.ok:
            raise BaseMismatchError(_layout_note(base_dir, state) + report.message)
    return state


def state_layout(state: State) -> dict | None:
    """Return the layout a state was built for: ``base.layout`` (format 1.1), else its calibration protocol's."""
    recorded = getattr(state.base, "layout", None)
    if recorded:
        return recorded
    protocol = state.calibration.get("protocol") if isinstance(state.calibration, dict) else None
    if isinstance(protocol, dict) and isinstance(protocol.get("layout"), str):
        experts = protocol.get("experts", ["transformer", "transformer_2"])
        return {"name": protocol["layout"], "pipeline": str(protocol.get("pipeline", "")).split(".")[-1],
                "transformers": list(experts) if isinstance(experts, list) else []}
    return None


def _layout_note(base_dir: str | os.PathLike, state: State) -> str:
    """Return "the state was built for layout A but the base is layout B ...; " when they differ, else "".

    Only for a state without ``base.layout`` (format 1.0), whose layout is known from its calibration
    protocol; for 1.1 states ``compare_with_base`` names both layouts itself.
    """
    from hif4fmt.layouts import describe_layout, layout_label

    if getattr(state.base, "layout", None):
        return ""  # format 1.1 records base.layout: verify's message names both layouts already
    recorded = state_layout(state)
    try:
        found = describe_layout(base_dir)
    except BaseCheckpointError:
        return ""
    if not recorded or recorded.get("name") == found.get("name"):
        return ""
    return (f"the state was built for layout {layout_label(recorded)} but the base is layout "
            f"{layout_label(found)}: use a state built for this model; ")


def base_profile(base_dir: Path):
    """Return the base's ``hif4fmt.layouts.PipelineProfile``; ``RuntimeLoadError`` for a folder of no Wan layout."""
    from hif4fmt.layouts import pipeline_profile

    if not (base_dir / MODEL_INDEX).is_file():
        raise RuntimeLoadError(f"{base_dir}: not a diffusers pipeline folder (no {MODEL_INDEX}); pass the "
                               "Wan model folder that holds model_index.json, transformer/, vae/, ...")
    try:
        return pipeline_profile(base_dir)
    except BaseCheckpointError as exc:
        raise RuntimeLoadError(str(exc)) from None


def _declared_components(base_dir: Path) -> set[str]:
    """Return the transformer components the base's model_index.json declares (non-null)."""
    try:
        index = json.loads((base_dir / MODEL_INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeLoadError(f"{base_dir / MODEL_INDEX}: cannot read: {exc}") from None
    if not isinstance(index, dict):
        raise RuntimeLoadError(f"{base_dir / MODEL_INDEX}: expected a JSON object")
    return {name for name in COMPONENTS if isinstance(index.get(name), list) and index[name][0] is not None}


def quantize_transformer_(model: nn.Module, component: str, state: State, device: torch.device | str = "cpu",
                          arithmetic: str | None = None) -> QuantizedComponent:
    """Replace, in place, every linear ``state`` lists for ``component`` by a HiF4Linear; return a summary.

    ``arithmetic``: "integer" or "simulated" for every layer (``HiF4Linear``); None: the device's default.

    The packed weights are built on ``device`` (on the CPU: all layers in one codec call); then layers
    are swapped one at a time, each original weight dropped right after. Raises ``RuntimeLoadError``
    naming the layer when it is missing from ``model``, is not an ``nn.Linear`` or has other in/out
    features than the state records (checked for every layer before any is changed).
    """
    arithmetic = resolve_arithmetic(arithmetic, device)
    check_layers_fit(model, component, state)
    return _install_packed(model, component, _packed_layers(model, component, state, device), arithmetic)


def check_layers_fit(model: nn.Module, component: str, state: State) -> None:
    """Raise ``RuntimeLoadError`` naming the first layer of ``component`` in ``state`` that ``model`` cannot take."""
    for layer in state.layers_of(component):
        where = f"{component}.{layer.module}"
        try:
            module = model.get_submodule(layer.module)
        except AttributeError:
            raise RuntimeLoadError(f"layer {where}: listed in the state but absent from the model; the state "
                                   "was built for another architecture") from None
        if isinstance(module, HiF4Linear):
            raise RuntimeLoadError(f"layer {where}: already quantized; apply a state to a BF16 model only once")
        if not isinstance(module, nn.Linear):
            raise RuntimeLoadError(f"layer {where}: expected torch.nn.Linear, found {type(module).__name__}")
        if (module.in_features, module.out_features) != (layer.in_features, layer.out_features):
            raise RuntimeLoadError(
                f"layer {where}: state has in/out features {layer.in_features}/{layer.out_features}, the model "
                f"has {module.in_features}/{module.out_features}; the state was built for another model")
        if layer.mask is None:
            raise RuntimeLoadError(f"layer {where}: the state was read without masks (header only)")
        check_rotation(layer.rotation, layer.in_features, where)


def _pack(model: nn.Module, component: str, layer, state: State, device: torch.device | str):
    """Return (packed HiF4(W / m) or HiF4(R(W / m)), rounded mask) of one checked layer; the model is not changed."""
    weight = model.get_submodule(layer.module).weight
    return pack_weight(weight, layer.mask, state.recipe.encoder, f"{component}.{layer.module}", device,
                       rotation=layer.rotation)



def _packed_layers(model: nn.Module, component: str, state: State, device: torch.device | str):
    """Yield (layer, (packed, mask)) for every layer of ``component``, in the state's order.

    On the CPU all layers go to one ``quantize_divided_many`` call (with the compiled kernel: one kernel
    call that spreads their rows over ``torch.get_num_threads()`` threads with the GIL released). For
    another device, or when a layer is rotated (HiF4(R(W / m)) is packed from the rotated float32
    quotient), layer by layer, each weight moved there on its own. Either way the BF16 weights stay
    until ``_install_packed`` swaps each layer.
    """
    layers = state.layers_of(component)
    weights = [model.get_submodule(layer.module).weight.detach() for layer in layers]
    if (torch.device(device).type != "cpu" or any(weight.device.type != "cpu" for weight in weights)
            or any(layer.rotation is not None for layer in layers)):
        del weights
        for layer in layers:
            yield layer, _pack(model, component, layer, state, device)
        return
    names = [f"{component}.{layer.module}" for layer in layers]
    masks = [rounded_mask(layer.mask, weight.shape[-1], weight.dtype, weight.device, name)
             for layer, weight, name in zip(layers, weights, names)]
    try:
        packed = quantize_divided_many(zip(weights, masks), state.recipe.encoder, [f"layer {name}" for name in names])
    except CodecError as exc:
        raise RuntimeLoadError(f"cannot quantize W / m: {exc}") from None
    del weights
    yield from zip(layers, zip(packed, masks))


def _install_packed(model: nn.Module, component: str, packed_layers, arithmetic: str) -> QuantizedComponent:
    """Swap each layer of ``packed_layers`` ((layer, (packed, mask)) pairs) for a HiF4Linear; return the summary.

    Each BF16 weight is dropped as soon as its layer is swapped; freed heap goes back to the OS every
    TRIM_EVERY_BYTES, and the rest of the model is copied out of the file mapping at the end.
    """
    bf16_bytes = packed_bytes = trimmed_at = layers = 0
    for layer, (packed, mask) in packed_layers:
        parent_name, _, child_name = layer.module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name)
        bf16_bytes += linear.weight.numel() * linear.weight.element_size()
        bias = linear.bias
        if bias is not None and bias.device != packed.device:
            bias = nn.Parameter(bias.detach().to(packed.device), requires_grad=False)
        quantized = HiF4Linear(packed, mask, bias, name=f"{component}.{layer.module}", arithmetic=arithmetic,
                               rotation=layer.rotation)
        setattr(parent, child_name, quantized)
        del linear.weight  # release the BF16 weight now, not when the loop ends
        packed_bytes += quantized.weight_nbytes
        layers += 1
        if bf16_bytes - trimmed_at >= TRIM_EVERY_BYTES:
            _return_freed_memory_to_os()
            trimmed_at = bf16_bytes
    _copy_out_of_file_mappings_(model)
    _return_freed_memory_to_os()
    return QuantizedComponent(component, layers, bf16_bytes, packed_bytes, arithmetic)


def _copy_out_of_file_mappings_(model: nn.Module) -> None:
    """Give every tensor of ``model`` except the packed HiF4 buffers its own memory, in place.

    diffusers loads safetensors through mmap: each parameter is a view of the mapped file, and the
    mapping (with every page the quantizer read) stays resident while any of them lives. Copying the
    few unquantized tensors (biases, norms, embeddings, boundary linears) lets the mapping go, so the
    resident size of a W4A4 expert is its packed weights plus those copies.
    """
    packed = {id(buffer) for module in model.modules() if isinstance(module, HiF4Linear)
              for buffer in (module.weight_codes, module.weight_meta, module.mask)}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in packed:
                tensor.data = tensor.data.clone()


def _return_freed_memory_to_os() -> None:
    """Ask glibc to hand freed heap pages back to the OS (no-op elsewhere).

    Quantizing works in row chunks whose float32 temporaries are freed at once, but glibc keeps the
    freed pages in its arenas; without this the process of a W4A4 load stays ~2x larger than its
    tensors (benchmarks/runtime_apply.py, medium model: resident 317 -> 152 MiB, peak 490 -> ~340 MiB).
    Called every TRIM_EVERY_BYTES of quantized weights: each call costs a few ms.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def apply_state(pipe, state: State, device: torch.device | str = "cpu", arithmetic: str | None = None
                ) -> list[QuantizedComponent]:
    """Quantize, in place, the experts of a loaded BF16 ``pipe`` that ``state`` lists; return summaries.

    ``arithmetic``: as for ``quantize_transformer_``."""
    summaries = []
    for component in state.components:
        if not state.layers_of(component):
            continue
        model = getattr(pipe, component, None)
        if model is None:
            raise RuntimeLoadError(f"component {component}: the state quantizes it but the pipeline has none")
        summaries.append(quantize_transformer_(model, component, state, device, arithmetic))
    return summaries


def _load_expert(base_dir: Path, component: str, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    try:
        return WanTransformer3DModel.from_pretrained(base_dir, subfolder=component, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"{base_dir / component}: cannot load {component}: {exc}") from None


def check_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a torch.device; ``RuntimeLoadError`` if torch cannot use it here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RuntimeLoadError(f"device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise RuntimeLoadError(f"device {device!r}: this torch ({torch.__version__}) is built without CUDA; "
                                   "install a CUDA build of torch 2.13.0 (README: Running on a GPU) or use cpu")
        if not torch.cuda.is_available():
            raise RuntimeLoadError(f"device {device!r}: no CUDA device is visible to torch; use cpu")
    return resolved


def load_pipeline(base_dir: str | os.PathLike, state_path: str | os.PathLike | None, *, verify: bool = True,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, arithmetic: str | None = None,
                  loras=None, loras_2=None, with_image: bool = False):
    """Return the base's diffusers pipeline on ``device``, W4A4 where ``state_path`` says.

    The class is the one ``model_index.json`` names (``WanPipeline`` / ``WanImageToVideoPipeline``);
    ``with_image`` True loads a text-and-image model (Wan2.2-TI2V) as ``WanImageToVideoPipeline`` so
    that it takes a first frame, and is refused (``RuntimeLoadError``) for a text-to-video model.

    ``loras`` / ``loras_2``: LoRAs (each a path or a ``(path, scale)`` pair, scale 1.0 by default) merged
    into ``transformer`` / ``transformer_2`` in BF16 after the state is verified against the unmodified
    base and before the expert is packed (``wan_runtime.lora``); ``pipe.applied_loras`` lists them
    (``AppliedLora``: path, sha256, scale, expert, layers). Bad LoRAs raise ``LoraError`` subclasses.

    ``state_path=None`` gives the plain pipeline (transformers and text encoder in ``dtype``, VAE in
    float32). With a state, every linear it lists becomes a ``HiF4Linear``; the base must match the
    state's fingerprint (``BaseMismatchError``) unless ``verify=False``. ``arithmetic``: how those
    layers compute, "integer" (int8 GEMM with per-unit float32 rescale, spec/hifloat4.md 8) or
    "simulated" (the challenge toolkit's QLinear, bit for bit); None or "auto": "integer" where a
    compiled integer product exists for ``device`` (CPU kernel, Triton on CUDA), else "simulated"
    (``HiF4Linear``; ``quantized_layers(pipe)`` shows what each layer runs). Raises
    ``RuntimeLoadError`` for a folder that is not a pipeline, a state that does not fit the model or
    an unknown arithmetic.
    """
    from hif4fmt.library_noise import drop_torchvision_notice

    drop_torchvision_notice()
    import diffusers
    from diffusers import AutoencoderKLWan

    check_device(device)
    arithmetic = resolve_arithmetic(arithmetic, device)
    base_dir = Path(base_dir)
    profile = base_profile(base_dir)
    problem = profile.image_problem(with_image, "an image")
    if problem:
        raise RuntimeLoadError(problem)
    pipeline_class = getattr(diffusers, profile.pipeline_for(with_image))
    lora_plan = {"transformer": lora_specs(loras), "transformer_2": lora_specs(loras_2)}  # scales checked first
    check_lora_files([*lora_plan["transformer"], *lora_plan["transformer_2"]])  # before any long work
    with collector_paused():
        return _load_pipeline(base_dir, state_path, verify, device, dtype, arithmetic, AutoencoderKLWan,
                              pipeline_class, lora_plan)


@contextmanager
def collector_paused():
    """Pause Python's cyclic garbage collector within the block (restored after, also on errors).

    Loading builds tens of thousands of long-lived objects (modules, parameters, configs); the
    collector, triggered by the allocation count, scans them over and over without finding garbage:
    on the medium model about half of a BF16 ``from_pretrained`` went to it (0.2 of 0.4 s,
    benchmarks/runtime_apply.py prints it). Reference counting still frees everything else at once;
    cyclic garbage made meanwhile waits for the next collection after the load.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_pipeline(base_dir: Path, state_path, verify: bool, device, dtype, arithmetic: str, AutoencoderKLWan,
                   pipeline_class, lora_plan: dict[str, list[LoraSpec]] | None = None):
    """The body of ``load_pipeline`` (arguments checked there)."""
    lora_plan = lora_plan or {}
    state = read_bound_state(base_dir, state_path, verify) if state_path is not None else None
    experts = {}
    applied = []
    declared = _declared_components(base_dir) if state is not None or any(lora_plan.values()) else set()
    for component in COMPONENTS:
        quantized = state is not None and component in state.components and bool(state.layers_of(component))
        if not quantized and not lora_plan.get(component):
            continue
        if component not in declared:
            raise RuntimeLoadError(f"component {component}: the {'state quantizes it' if quantized else 'LoRAs target it'}"
                                   f" but {base_dir / MODEL_INDEX} does not declare it")
        experts[component] = _load_expert(base_dir, component, dtype)  # one BF16 expert at a time
        if quantized:
            check_layers_fit(experts[component], component, state)
        applied += merge_loras_(experts[component], component, lora_plan.get(component, []),
                                {layer.module for layer in state.layers_of(component)} if quantized else None)
        if quantized:
            quantize_transformer_(experts[component], component, state, device, arithmetic)
    try:
        vae = AutoencoderKLWan.from_pretrained(base_dir, subfolder="vae", dtype=VAE_DTYPE)
        pipe = pipeline_class.from_pretrained(base_dir, vae=vae, dtype=dtype, **experts)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"{base_dir}: cannot load the pipeline: {exc}") from None
    pipe.applied_loras = applied
    return pipe.to(device)


def quantized_layers(pipe) -> dict[str, list[HiF4Linear]]:
    """Return {component: [HiF4Linear, ...]} for the experts of ``pipe`` (empty lists when BF16)."""
    found = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            found[component] = [m for m in model.modules() if isinstance(m, HiF4Linear)]
    return found
