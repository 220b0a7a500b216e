"""Make a hub-ready folder for a .hif4 state: the state file plus a README.md model card.

Why this module exists: a state is useless without its exact base checkpoint and the commands to check
and run it, so the card says which base it is bound to (fingerprint, hub hints), what recipe built it,
how many layers it quantizes, how small it is next to the base, and the exact ``hif4fmt verify`` and
``wan-runtime generate`` commands. The text is a pure function of the state (no dates), so the same
state always gives the same card. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hif4fmt.atomic import atomic_set, check_outputs
from hif4fmt.errors import OutputPathError, StateWriteError
from hif4fmt.layouts import layout_label
from hif4fmt.state import State, read_state

DEFAULT_BASE_MODEL = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"  # the base this project targets
CARD_NAME = "README.md"
CARD_TAGS = ("hifloat4", "hif4", "w4a4", "quantization", "ptq", "hif4fmt")  # plus the layout's family and task


@dataclass(frozen=True)
class CardDefaults:
    """What a card says for one Wan layout: the official diffusers repo, the hub task, the family tag and
    whether ``wan-runtime generate`` needs an ``--image`` (I2V) or takes one optionally (TI2V)."""

    repo_id: str
    pipeline_tag: str
    family: str
    image: str  # "required", "optional" or "none"


# layout name (hif4fmt.layouts, recorded in base.layout of a 1.1 state) -> card defaults
CARD_DEFAULTS = {
    "wan2.2-i2v-a14b": CardDefaults("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "image-to-video", "wan2.2", "required"),
    "wan2.2-t2v-a14b": CardDefaults("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "text-to-video", "wan2.2", "none"),
    "wan2.2-ti2v-5b": CardDefaults("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "text-to-video", "wan2.2", "optional"),
    "wan2.1-t2v-14b": CardDefaults("Wan-AI/Wan2.1-T2V-14B-Diffusers", "text-to-video", "wan2.1", "none"),
    "wan2.1-i2v-14b": CardDefaults("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "image-to-video", "wan2.1", "required"),
}
LEGACY_DEFAULTS = CARD_DEFAULTS["wan2.2-i2v-a14b"]  # a 1.0 state records no layout: the project's first model


def card_defaults(state: State) -> CardDefaults:
    """Return the card defaults for the layout ``state`` records (A14B I2V for 1.0 states or unknown layouts)."""
    layout = state.base.layout or {}
    return CARD_DEFAULTS.get(layout.get("name"), LEGACY_DEFAULTS)
LICENSE_PLACEHOLDER = "other  # TODO: set to the base model's license (Wan2.2 is apache-2.0)"
COPY_CHUNK_BYTES = 16 * 1024 * 1024
STATE_SUFFIX = ".hif4"  # files a previous card folder may hold besides README.md
# a Hugging Face repo id: ORG/NAME of [A-Za-z0-9._-]; it goes into YAML and shell commands, so nothing else
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
RUN_DEVICE = "cuda"  # the A14B experts need a GPU; wan-runtime's default device is cpu


def _human_bytes(count: int) -> str:
    """Return ``count`` bytes as a short human string with binary units (e.g. "18.8 MiB")."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _cell(value: Any) -> str:
    """Return ``value`` as one markdown table cell: JSON for lists, no newlines, pipes escaped, no controls."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, list) else str(value)
    return "".join(ch if ch.isprintable() else " " for ch in text).replace("|", "\\|")


def flatten_mapping(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Return (dotted key, value) pairs of a nested map, sorted by key path."""
    rows: list[tuple[str, Any]] = []
    for key in sorted(mapping):
        value = mapping[key]
        if isinstance(value, dict) and value:
            rows += flatten_mapping(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a hub repo id ``ORG/NAME``; else ``StateWriteError`` (it is written into
    YAML and shell commands, so nothing else is accepted)."""
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.fullmatch(repo_id):
        raise StateWriteError(f"base model {repo_id!r} is not a hub repo id: expected ORG/NAME of letters, digits, "
                              f"'.', '_' and '-', e.g. {DEFAULT_BASE_MODEL}")
    return repo_id


def choose_base_model(state: State, base_model: str | None) -> tuple[str, str]:
    """Return (hub repo id for ``base_model``, where it came from: "option", "hub hint" or "default")."""
    if base_model is not None:
        return check_repo_id(base_model), "option"
    hinted = state.base.hub_hints.get("repo_id")
    if hinted and REPO_ID_PATTERN.fullmatch(hinted):
        return hinted, "hub hint"
    return card_defaults(state).repo_id, "default"


def render_model_card(state: State, state_filename: str, state_bytes: int, base_model: str | None = None,
                      state_sha256: str | None = None) -> str:
    """Return the README.md text (YAML front matter + markdown) for ``state`` saved as ``state_filename``.

    ``state_sha256`` (hex), when given, is written into the card, so a card can be matched to the exact
    state file it describes (``sha256sum``).
    ``base_model`` (a hub repo id) defaults to the state's ``repo_id`` hub hint when that is a valid repo
    id, else to ``DEFAULT_BASE_MODEL``. ``state_filename`` is shell-quoted in the commands.
    """
    recipe = state.recipe
    quoted = shlex.quote(state_filename)
    repo_id, _ = choose_base_model(state, base_model)
    base_bytes = state.base.total_bytes
    ratio = f"{state_bytes / base_bytes:.4%}" if base_bytes else "n/a"
    rows = []
    for component in state.components:
        rows.append(f"| {component} | {len(state.layers_of(component))} | {len(state.excluded_of(component))} | "
                    f"`{state.base.components.get(component, 'unbound')[:16]}` |")
    calibration = "\n".join(f"| {_cell(key)} | {_cell(value)} |" for key, value in flatten_mapping(state.calibration)
                            ) or "| (none recorded) | |"
    retained = ", ".join(str(b) for b in recipe.retained_blocks) or "none"
    hints = _cell(", ".join(f"{k}={v}" for k, v in sorted(state.base.hub_hints.items())) or "none")
    percentile = f"p{recipe.percentile:g}" if recipe.percentile is not None else "max"
    defaults = card_defaults(state)
    tags = (*CARD_TAGS, defaults.family, defaults.pipeline_tag)
    own_recipe = sum(layer.recipe is not None for layer in state.layers)
    rotated = sum(layer.rotation is not None for layer in state.layers)
    image_option = {"required": "--image input.png ", "optional": "[--image input.png] ", "none": ""}[defaults.image]
    layout = state.base.layout
    application = ("`HiF4(R(x * m)) @ HiF4(R(W / m)).T + b` (R the layer's recorded rotation, identity for most)"
                   if rotated else "`HiF4(x * m) @ HiF4(W / m).T + b`")
    lines = [
        "---",
        f"base_model: {repo_id}",
        "base_model_relation: quantized",
        f"license: {LICENSE_PLACEHOLDER}",
        "library_name: hif4fmt",
        f"pipeline_tag: {defaults.pipeline_tag}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
        f"# HiFloat4 W4A4 state for {repo_id}",
        "",
        f"`{_cell(state_filename)}` is a compact post-training quantization state in the `.hif4` format "
        f"(format {state.layout.format_version if state.layout else '1.0'}). It holds **no weights**: only "
        f"per-input-channel masks and descriptors. Applied to the exact base checkpoint it is bound to, it "
        f"turns each quantized linear into {application} (HiFloat4 weights and "
        f"activations, 64-element units).",
        "",
        "## Files and size",
        "",
        "| | bytes | |",
        "|---|---:|---|",
        f"| `{_cell(state_filename)}` | {state_bytes} | {_human_bytes(state_bytes)} |",
        f"| base transformer weights | {base_bytes} | {_human_bytes(base_bytes)} |",
        f"| state / base | | {ratio} |",
        *([] if state_sha256 is None else ["", f"sha256 of `{_cell(state_filename)}`: `{state_sha256}` (this card "
                                               f"describes that file only; check with `sha256sum {quoted}`)"]),
        "",
        "## Base binding",
        "",
        f"- fingerprint algorithm: `{state.base.algorithm}`",
        f"- base fingerprint: `{state.base.fingerprint}`",
        f"- hub hints (informative only, never trusted): {hints}",
        f"- base layout: {_cell(layout_label(layout)) if layout else 'not recorded (format 1.0)'}",
        "",
        "| component | quantized linears | kept high precision | digest |",
        "|---|---:|---:|---|",
        *rows,
        "",
        "## Recipe",
        "",
        f"- statistic: {recipe.statistic} ({percentile} of |x| per input channel over all calibration tokens)",
        f"- alpha: {recipe.alpha:g}, eps: {recipe.eps:g}: `m_i = w_i**alpha / (a_i + eps)**(1 - alpha)`",
        f"- HiF4 encoder: {recipe.encoder}; mask dtype: {recipe.mask_dtype}",
        f"- whole blocks kept high precision: {retained}",
        *([f"- per-layer recipes (`hif4fmt build --search`): {own_recipe} of {len(state.layers)} layers record "
           f"their own percentile and alpha (`hif4fmt inspect --layers` lists them)"] if own_recipe else []),
        *([f"- Hadamard rotation (`hadamard-64`, R = blockdiag(H64 / 8) per HiF4 unit): {rotated} layers; "
           f"readers of format 1.0 refuse this state rather than misapply it"] if rotated else []),
        "",
        "## Calibration",
        "",
        "| key | value |",
        "|---|---|",
        calibration,
        "",
        "## Verify and run",
        "",
        "Download the base checkpoint, then check that this state belongs to it (exit 0 = match, "
        "1 = different base, 2 = invalid input):",
        "",
        "```bash",
        f"hf download {repo_id} --local-dir BASE_DIR",
        f"hif4fmt verify {quoted} --base BASE_DIR",
        "```",
        "",
        "Generate a video with the W4A4 model:",
        "",
        "```bash",
        f"wan-runtime generate --base BASE_DIR --state {quoted} {image_option}"
        f"--prompt \"A cat surfing a wave\" --out video.mp4 --device {RUN_DEVICE}",
        "```",
        "",
        "Inspect the state without loading any model:",
        "",
        "```bash",
        f"hif4fmt inspect {quoted} --layers",
        "```",
        "",
    ]
    return "\n".join(lines)


def _check_card_folder(out_dir: Path, force: bool) -> None:
    """Refuse an existing ``out_dir`` that holds anything but a previous card, or one without ``force``."""
    if not out_dir.is_dir():
        return
    names = sorted(os.listdir(out_dir))
    others = [name for name in names if name != CARD_NAME and not (name.endswith(STATE_SUFFIX) and
                                                                    (out_dir / name).is_file())]
    if others:
        raise OutputPathError(f"--out {out_dir} holds files that are not a model card ({', '.join(others[:5])}); "
                              f"the whole folder is replaced, so choose a new or empty folder")
    if names and not force:
        raise OutputPathError(f"--out {out_dir}: {', '.join(names)} already exist; pass --force to replace the "
                              f"card folder, or choose an empty folder")


def _copy_hashing(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` in chunks; return the sha256 (hex) of the bytes copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def write_card(state_path: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None,
               force: bool = False) -> dict[str, Any]:
    """Write the folder ``out_dir`` holding <state file name> and README.md, as a whole; return a summary dict.

    ``out_dir`` is checked first (``hif4fmt.atomic.check_outputs``; its parent must exist); an existing
    folder is replaced only with ``force`` and only if it holds nothing but a previous card. The state is
    validated fully, copied into a temporary folder beside ``out_dir``, the card (which names the copy's
    sha256) written next to it, and the temporary folder renamed to ``out_dir``
    (``hif4fmt.atomic.atomic_set``): readers see the old card folder or the new one, never a mix.
    Raises ``OutputPathError`` for a refused folder, ``StateFormatError`` for a bad state,
    ``StateWriteError`` when the folder cannot be written.
    """
    state_path, out_dir = Path(state_path), Path(out_dir)
    if base_model is not None:
        check_repo_id(base_model)
    notes = check_outputs({"--out": out_dir}, inputs={"STATE": state_path}, force=force, folder_outputs=("--out",))
    _check_card_folder(out_dir, force)
    state = read_state(state_path)  # validated fully before anything is written
    target_state = out_dir / state_path.name
    target_card = out_dir / CARD_NAME
    with atomic_set([out_dir], StateWriteError, what=f"the card folder {out_dir}", folder=True) as (temp,):
        try:
            sha256 = _copy_hashing(state_path, temp / state_path.name)
        except OSError as exc:
            raise StateWriteError(f"{state_path}: cannot copy the state into the card folder: {exc}") from None
        state_bytes = (temp / state_path.name).stat().st_size
        card = render_model_card(state, state_path.name, state_bytes, base_model, state_sha256=sha256)
        (temp / CARD_NAME).write_bytes(card.encode("utf-8"))
    repo_id, source = choose_base_model(state, base_model)
    return {"out": str(out_dir), "state": str(target_state), "card": str(target_card), "state_bytes": state_bytes,
            "state_sha256": sha256, "notes": notes, "base_model": repo_id, "base_model_source": source,
            "base_bytes": state.base.total_bytes,
            "components": {c: {"quantized": len(state.layers_of(c)), "excluded": len(state.excluded_of(c))}
                           for c in state.components}}
