"""Read-only access to a base checkpoint's transformer weights, straight from safetensors files.

Why this module exists: the fingerprint, ``verify``, the builder and the runtime all need the base
transformers' tensors by name (dtype, shape, raw bytes) without torch, for every dtype safetensors
stores (BF16 included, which numpy cannot name) and whether the weights are one file or sharded with an
``*.index.json``. We parse the safetensors header ourselves, bounding every length and offset before
use, and hand out mmap-backed views of the raw little-endian bytes, so nothing is copied until asked.

Layouts accepted by ``BaseCheckpoint.open`` (spec 6.1):
  * a diffusers pipeline folder: ``model_index.json`` plus ``transformer/`` and/or ``transformer_2/``;
  * a single component folder holding its ``config.json`` and ``diffusion_pytorch_model*.safetensors``
    (+ optional index). Without ``config.json`` a folder is refused: its safetensors could be anything.
A component ``model_index.json`` declares must have its folder; symlink loops and dangling links are
refused by name, never skipped.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hif4fmt.constants import (
    COMPONENT_CONFIG_NAME,
    INDEX_SUFFIX,
    MAX_INDEX_BYTES,
    MODEL_INDEX_NAME,
    SAFETENSORS_DTYPE_BITS,
    SAFETENSORS_LENGTH_BYTES,
    SAFETENSORS_MAX_HEADER_BYTES,
    SAFETENSORS_MAX_TENSORS,
    SAFETENSORS_METADATA_KEY,
    SAFETENSORS_NUMPY_DTYPES,
    SAFETENSORS_SUFFIX,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from hif4fmt.errors import BaseCheckpointError
from hif4fmt.jsonfile import load_json_file, reject_duplicate_keys
from hif4fmt.recipe import COMPONENTS

DEFAULT_SINGLE_COMPONENT = COMPONENTS[0]  # name given to a single component folder not named after one
# a Hugging Face cache path: .../models--ORG--NAME/snapshots/REVISION (repo names: [A-Za-z0-9._-], no "--")
_HUB_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[A-Za-z0-9][A-Za-z0-9._-]*?)--(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
                           r"/snapshots/(?P<revision>[0-9a-f]{6,64})(?:/|$)")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's raw bytes live: ``file`` at absolute byte ``begin``, ``nbytes`` long."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute offset in ``file`` (8 + header length + data_offsets[0])
    nbytes: int


def _load_json(path: Path, what: str) -> Any:
    """Return the parsed JSON of a small file (index, model_index); bounded in size, duplicates refused."""
    return load_json_file(path, what, MAX_INDEX_BYTES, BaseCheckpointError)


def _element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Return ({name: TensorEntry}, metadata) of one .safetensors file, every offset bounds-checked.

    Raises ``BaseCheckpointError`` naming the file, the tensor and the expected vs found value for a
    short file, an oversized or non-JSON header, more than ``SAFETENSORS_MAX_TENSORS`` tensors, an
    unknown dtype, a size that does not match the shape, data offsets outside the file, or two tensors
    whose bytes overlap.
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            length_bytes = handle.read(SAFETENSORS_LENGTH_BYTES)
            if len(length_bytes) != SAFETENSORS_LENGTH_BYTES:
                raise BaseCheckpointError(f"{path}: {file_size} bytes is too short for a safetensors file "
                                          f"(the 8-byte header length is missing)")
            header_length = int.from_bytes(length_bytes, "little")
            if header_length > SAFETENSORS_MAX_HEADER_BYTES or header_length > file_size - SAFETENSORS_LENGTH_BYTES:
                raise BaseCheckpointError(
                    f"{path}: safetensors header length {header_length} exceeds the file ({file_size} bytes) "
                    f"or the {SAFETENSORS_MAX_HEADER_BYTES}-byte limit; the file is truncated or not safetensors")
            header_bytes = handle.read(header_length)
    except OSError as exc:
        raise BaseCheckpointError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BaseCheckpointError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BaseCheckpointError(f"{path}: safetensors header must be a JSON object, found {type(header).__name__}")
    if len(header) - (SAFETENSORS_METADATA_KEY in header) > SAFETENSORS_MAX_TENSORS:
        raise BaseCheckpointError(f"{path}: {len(header)} tensors in one safetensors file; at most "
                                  f"{SAFETENSORS_MAX_TENSORS} are accepted (this is not a model checkpoint)")
    data_start = SAFETENSORS_LENGTH_BYTES + header_length
    data_length = file_size - data_start
    metadata: dict[str, str] = {}
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == SAFETENSORS_METADATA_KEY:
            if isinstance(info, dict):
                metadata = {str(k): str(v) for k, v in info.items()}
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise BaseCheckpointError(f"{where}: expected an object with dtype/shape/data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise BaseCheckpointError(f"{where}: unknown dtype {dtype!r}; expected one of "
                                      f"{', '.join(SAFETENSORS_DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BaseCheckpointError(f"{where}: shape {shape!r} must be a list of integers >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_length):
            raise BaseCheckpointError(f"{where}: data_offsets {offsets!r} must be [begin, end] with "
                                      f"0 <= begin <= end <= {data_length} (the data section size)")
        expected = math.ceil(_element_count(tuple(shape)) * SAFETENSORS_DTYPE_BITS[dtype] / 8)
        if offsets[1] - offsets[0] != expected:
            raise BaseCheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes stored but dtype {dtype} "
                                      f"shape {shape} needs {expected}")
        entries[name] = TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0], expected)
    _refuse_overlaps(path, entries)
    return entries, metadata


def _refuse_overlaps(path: Path, entries: dict[str, TensorEntry]) -> None:
    """Raise ``BaseCheckpointError`` naming two tensors whose byte ranges overlap (the safetensors library
    refuses such files; two names over the same bytes would hash one weight twice)."""
    ranges = sorted((entry.begin, entry.begin + entry.nbytes, name) for name, entry in entries.items() if entry.nbytes)
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise BaseCheckpointError(f"{path}: tensors {first!r} and {second!r} overlap (bytes {begin} to {end} of "
                                      f"the file belong to both); the file is corrupt or crafted")


class ComponentCheckpoint:
    """One transformer's weights: tensors by name across one or more safetensors files (read-only)."""

    def __init__(self, name: str, folder: Path, entries: dict[str, TensorEntry], files: list[Path]):
        self.name = name
        self.folder = folder
        self.files = files
        self._entries = entries
        self._maps: dict[Path, mmap.mmap] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike, name: str | None = None) -> "ComponentCheckpoint":
        """Return the component stored in ``folder`` (single file, index + shards, or several shards)."""
        folder = Path(folder)
        if not _existing(folder) or not folder.is_dir():
            raise BaseCheckpointError(f"{folder}: not a folder; expected a component folder with "
                                      f"{WEIGHTS_NAME} (or shards and {WEIGHTS_INDEX_NAME})")
        config = folder / COMPONENT_CONFIG_NAME
        if not _existing(config) or not config.is_file():
            raise BaseCheckpointError(f"{folder}: no {COMPONENT_CONFIG_NAME}, so this is not a transformer folder "
                                      f"(its *.safetensors may be anything, e.g. calibration statistics); pass the "
                                      f"diffusers model folder (with {MODEL_INDEX_NAME}) or a transformer folder")
        if not isinstance(_load_json(config, "the transformer config"), dict):
            raise BaseCheckpointError(f"{config}: expected a JSON object (a diffusers transformer config)")
        name = name or (folder.name if folder.name in COMPONENTS else DEFAULT_SINGLE_COMPONENT)
        if (folder / WEIGHTS_INDEX_NAME).is_file():
            return cls._open_indexed(name, folder, folder / WEIGHTS_INDEX_NAME)
        if (folder / WEIGHTS_NAME).is_file():
            files = [folder / WEIGHTS_NAME]
        else:
            indexes = sorted(p for p in folder.glob(f"*{INDEX_SUFFIX}") if p.is_file())
            if len(indexes) == 1:
                return cls._open_indexed(name, folder, indexes[0])
            if len(indexes) > 1:
                raise BaseCheckpointError(f"{folder}: several index files ({', '.join(p.name for p in indexes)}); "
                                          f"keep one, or open a folder holding only the variant you want")
            files = sorted(p for p in folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
        if not files:
            raise BaseCheckpointError(f"{folder}: no *.safetensors weights found; expected {WEIGHTS_NAME} "
                                      f"or shards with {WEIGHTS_INDEX_NAME}")
        entries: dict[str, TensorEntry] = {}
        for file in files:
            file_entries, _ = parse_safetensors_header(file)
            for tensor_name, entry in file_entries.items():
                if tensor_name in entries:
                    raise BaseCheckpointError(
                        f"{folder}: tensor {tensor_name!r} is in both {entries[tensor_name].file.name} and "
                        f"{file.name}; remove the extra variant files or add {WEIGHTS_INDEX_NAME}")
                entries[tensor_name] = entry
        return cls(name, folder, entries, files)

    @classmethod
    def _open_indexed(cls, name: str, folder: Path, index_path: Path) -> "ComponentCheckpoint":
        index = _load_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BaseCheckpointError(f"{index_path}: expected {{\"weight_map\": {{tensor: file}}}}")
        shard_names = sorted(set(weight_map.values()))
        entries: dict[str, TensorEntry] = {}
        files = []
        for shard_name in shard_names:
            if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
                raise BaseCheckpointError(f"{index_path}: shard {shard_name!r} must be a file name in the "
                                          f"same folder (no path separators)")
            shard = folder / shard_name
            if not shard.is_file():
                raise BaseCheckpointError(f"{index_path}: shard {shard_name} is listed but missing from {folder}")
            files.append(shard)
            shard_entries, _ = parse_safetensors_header(shard)
            for tensor_name, entry in shard_entries.items():
                if weight_map.get(tensor_name) != shard_name:
                    raise BaseCheckpointError(
                        f"{shard}: tensor {tensor_name!r} is not mapped to this shard in {index_path.name} "
                        f"(index says {weight_map.get(tensor_name)!r}); the index and shards disagree")
                entries[tensor_name] = entry
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise BaseCheckpointError(f"{index_path}: {len(missing)} tensors listed but not in their shard, "
                                      f"first {missing[0]!r} (expected in {weight_map[missing[0]]})")
        return cls(name, folder, entries, files)

    def tensor_names(self) -> list[str]:
        """Return every tensor name, sorted by code point (= UTF-8 byte order)."""
        return sorted(self._entries)

    def has_tensor(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        """Return where tensor ``name`` lives; ``BaseCheckpointError`` naming the component if absent."""
        try:
            return self._entries[name]
        except KeyError:
            raise BaseCheckpointError(f"{self.folder}: component {self.name} has no tensor {name!r}") from None

    def tensor_info(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """Return (safetensors dtype string, shape, nbytes) of tensor ``name``."""
        entry = self.entry(name)
        return entry.dtype, entry.shape, entry.nbytes

    @property
    def total_bytes(self) -> int:
        """Return the sum of all tensors' raw byte sizes (headers and padding not counted)."""
        return sum(e.nbytes for e in self._entries.values())

    def _map(self, file: Path) -> mmap.mmap | None:
        if file not in self._maps:
            try:
                with open(file, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size == 0:
                        return None
                    self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise BaseCheckpointError(f"{file}: cannot map for reading: {exc}") from None
        return self._maps[file]

    def read_tensor_bytes(self, name: str) -> memoryview:
        """Return the raw little-endian bytes of tensor ``name`` as an mmap-backed memoryview (no copy)."""
        entry = self.entry(name)
        if entry.nbytes == 0:
            return memoryview(b"")
        mapped = self._map(entry.file)
        if mapped is None or entry.begin + entry.nbytes > len(mapped):
            raise BaseCheckpointError(f"{entry.file}: tensor {name!r} ends at byte {entry.begin + entry.nbytes} "
                                      f"but the file is shorter (it changed since it was opened?)")
        return memoryview(mapped)[entry.begin:entry.begin + entry.nbytes]

    def read_tensor_numpy(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Return tensor ``name`` as a new numpy array of ``dtype`` (shape as stored; BF16/F16 widened).

        BF16 is widened exactly by shifting its 16 bits into the high half of a float32.
        """
        entry = self.entry(name)
        if entry.dtype not in SAFETENSORS_NUMPY_DTYPES:
            raise BaseCheckpointError(f"{entry.file}: tensor {name!r} has dtype {entry.dtype}, which has no "
                                      f"numpy equivalent; use read_tensor_bytes for its raw bytes")
        raw = np.frombuffer(self.read_tensor_bytes(name), dtype=SAFETENSORS_NUMPY_DTYPES[entry.dtype])
        if entry.dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(dtype, copy=True).reshape(entry.shape)

    def close(self) -> None:
        """Release the file maps (views still held elsewhere keep their map alive)."""
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:
                pass  # a memoryview handed out is still alive; the map closes when it is collected
        self._maps.clear()


class BaseCheckpoint:
    """A base checkpoint: its transformer components by name (``transformer``, ``transformer_2``)."""

    def __init__(self, path: Path, components: dict[str, ComponentCheckpoint]):
        self.path = path
        self.components = components

    @classmethod
    def open(cls, path: str | os.PathLike) -> "BaseCheckpoint":
        """Return the checkpoint at ``path``: a diffusers pipeline folder or one component folder.

        Raises ``BaseCheckpointError`` when the folder holds neither, naming what was expected.
        """
        path = Path(path)
        if not _existing(path):
            raise BaseCheckpointError(f"{path}: no such file or folder; pass the diffusers model folder "
                                      f"(with {MODEL_INDEX_NAME}) or a transformer folder")
        if not path.is_dir():
            raise BaseCheckpointError(f"{path}: expected a folder (diffusers model or transformer folder), "
                                      f"found a file")
        names: list[str]
        if (path / MODEL_INDEX_NAME).is_file():
            model_index = _load_json(path / MODEL_INDEX_NAME, "model_index.json")
            if not isinstance(model_index, dict):
                raise BaseCheckpointError(f"{path / MODEL_INDEX_NAME}: expected a JSON object")
            names = [c for c in COMPONENTS if _declared(model_index.get(c))]
            missing = [c for c in names if not _existing(path / c)]
            if missing:
                raise BaseCheckpointError(f"{path}: {MODEL_INDEX_NAME} declares {missing[0]} but there is no "
                                          f"{missing[0]}/ folder; the download is incomplete")
            if not names:
                raise BaseCheckpointError(f"{path}: {MODEL_INDEX_NAME} declares none of "
                                          f"{', '.join(COMPONENTS)} with a folder; not a Wan transformer pipeline")
        elif any(_existing(path / c) and (path / c).is_dir() for c in COMPONENTS):
            names = [c for c in COMPONENTS if _existing(path / c) and (path / c).is_dir()]
        else:
            component = ComponentCheckpoint.open(path)
            return cls(path, {component.name: component})
        return cls(path, {name: ComponentCheckpoint.open(path / name, name) for name in names})

    def hub_hints(self) -> dict[str, str]:
        """Return {"repo_id", "revision"} guessed from a Hugging Face cache path, else {} (never trusted)."""
        match = _HUB_SNAPSHOT.search(self.path.resolve().as_posix())
        if not match:
            return {}
        return {"repo_id": f"{match['org']}/{match['name']}", "revision": match["revision"]}

    @property
    def total_bytes(self) -> int:
        """Return the raw tensor bytes of all components together."""
        return sum(c.total_bytes for c in self.components.values())

    def close(self) -> None:
        for component in self.components.values():
            component.close()

    def __enter__(self) -> "BaseCheckpoint":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _existing(path: Path) -> bool:
    """True when ``path`` exists; False when it does not; ``BaseCheckpointError`` for a symlink loop or a
    symlink pointing nowhere (``Path.exists`` would call both "missing" and skip a component silently)."""
    try:
        os.stat(path)
        return True
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BaseCheckpointError(f"{path}: symbolic link loop (it resolves to itself); point it at the real "
                                      f"folder or remove it") from None
        if os.path.islink(path):
            raise BaseCheckpointError(f"{path}: symbolic link to {os.readlink(path)}, which does not exist; point it "
                                      f"at the real folder or remove it") from None
        return False


def _declared(entry: Any) -> bool:
    """True when a model_index.json entry names a class (``["diffusers", "WanTransformer3DModel"]``)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
