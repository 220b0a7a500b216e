"""Write and read the calibration statistics file (safetensors + a JSON header in its metadata).

Why this module exists: calibration runs the model once; ``build`` may then sweep the percentile and
alpha many times. The statistics file is the hand-off: per target layer the sketch (histogram counts,
exact max/min, non-finite counts, tokens) and a held-out sample of input rows, plus the provenance of
the run (protocol, prompt digest, seed, base fingerprint, sketch parameters). Layout and every rule the
reader enforces: spec/stats-v1.md section 5. The writer is atomic and deterministic (same statistics,
same bytes); the reader refuses anything malformed with ``StatsFormatError`` naming the file, the layer
and the field, and loads one layer at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from hif4fmt import __version__
from hif4fmt.atomic import atomic_set
from hif4fmt.calibration.constants import (
    COUNT_DTYPE,
    FLOAT32_ABS_MASK,
    HOLDOUT_DTYPES,
    HOLDOUT_SELECTION,
    MAX_CHANNELS,
    MAX_HOLDOUT_ROWS,
    MAX_STATS_HEADER_BYTES,
    MAX_STATS_LAYERS,
    SKETCH_KIND,
    STATS_FORMAT_NAME,
    STATS_MAJOR,
    STATS_METADATA_KEY,
    STATS_MINOR,
    TENSOR_NAME,
)
from hif4fmt.calibration.hooks import LayerObservation, splitmix64
from hif4fmt.calibration.protocol import CalibrationProtocol
from hif4fmt.calibration.sketch import PercentileEstimate, SketchGrid, estimate_percentile
from hif4fmt.errors import StatsFormatError

SAFETENSORS_LENGTH_BYTES = 8  # u64 little-endian header length at the start of a safetensors file
MAX_SAFETENSORS_HEADER_BYTES = 64 * 1024 * 1024  # tensor table (~100 B x 6 per layer) + our JSON header
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HEADER_KEYS = ("format", "format_version", "producer", "sketch", "protocol", "prompts", "base", "holdout",
               "layers")
LAYER_KEYS = ("component", "module", "in_features", "out_features", "tokens", "calls", "bin_offset",
              "stored_bins", "holdout_rows", "holdout_dtype")


def tensor_name(component: str, module: str, field: str) -> str:
    """Return the safetensors name of one per-layer field: ``<component>/<module>.<field>`` (spec 5.3)."""
    return TENSOR_NAME.format(component=component, module=module, field=field)


def layer_key(component: str, module: str) -> str:
    """Return the key of a layer in header["layers"]: ``<component>/<module>``."""
    return f"{component}/{module}"


@dataclass(frozen=True)
class LayerInfo:
    """The header entry of one layer (spec 5.2.4): shape, tokens and calls seen, stored bin range, sample."""

    component: str
    module: str
    in_features: int
    out_features: int
    tokens: int  # rows (tokens x batch) observed: every channel's histogram sums to this
    calls: int  # forward calls observed
    bin_offset: int  # first grid bin stored (bins before it are empty in every channel)
    stored_bins: int  # bins stored; bins after bin_offset + stored_bins are empty too
    holdout_rows: int
    holdout_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in LAYER_KEYS}


@dataclass
class LayerStats:
    """One layer's statistics as loaded: full-grid counts int64 (C, bins), exact absmax/absmin float32 (C,),
    nonfinite int64 (C,), held-out rows (R, C) in their activation dtype and their ids int64 (R,)."""

    info: LayerInfo
    grid: SketchGrid
    counts: torch.Tensor
    absmax: torch.Tensor
    absmin: torch.Tensor
    nonfinite: torch.Tensor
    holdout: torch.Tensor
    holdout_ids: torch.Tensor

    def percentile(self, percentile: float) -> PercentileEstimate:
        """Return the per-channel percentile estimate of |x| (float64 (C,), spec 3.2)."""
        return estimate_percentile(self.grid, self.counts, self.absmin, self.absmax, percentile)


@dataclass(frozen=True)
class StatsHeader:
    """The parsed JSON header (spec 5.2); ``layers`` keyed by (component, module)."""

    format_version: str
    producer: dict[str, Any]
    grid: SketchGrid
    protocol: CalibrationProtocol
    protocol_dict: dict[str, Any]
    prompts: dict[str, Any]
    base: dict[str, Any] | None
    holdout: dict[str, Any]
    layers: dict[tuple[str, str], LayerInfo]

    def components(self) -> list[str]:
        return sorted({component for component, _ in self.layers})


# --- writing ------------------------------------------------------------------------------------------


def _stored_range(counts: torch.Tensor) -> tuple[int, int]:
    """Return (bin_offset, stored_bins) of the smallest bin range holding every non-zero count."""
    occupied = torch.nonzero(counts.sum(0) > 0).flatten()
    if occupied.numel() == 0:
        return 0, 0
    first, last = int(occupied[0]), int(occupied[-1])
    return first, last - first + 1


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file so readers see the old file or the complete new one, never a part.

    Raises ``StatsFormatError`` naming ``path`` when it cannot be written (a full disk makes the
    safetensors library raise ``SafetensorError``, an ``OSError`` elsewhere); nothing is left behind.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_set([path], StatsFormatError, what=f"the statistics file {path}") as (temp,):
        try:
            save_file(tensors, str(temp), metadata=metadata)
        except SafetensorError as exc:
            raise StatsFormatError(f"{path}: cannot write the statistics file: {exc}") from None


def write_stats(path: str | os.PathLike, grid: SketchGrid, protocol: CalibrationProtocol,
                prompts: dict[str, Any], base: dict[str, Any] | None, holdout_rows: int,
                observations: Iterable[LayerObservation]) -> dict[str, Any]:
    """Write the statistics file atomically and return its JSON header (a dict).

    ``base`` is the base binding (algorithm, fingerprint, component digests, total_bytes) or None when
    the fingerprint could not be taken. Raises ``StatsFormatError`` if the file cannot be written.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for observation in observations:
        sketch, sample = observation.sketch, observation.holdout
        counts = sketch.counts.cpu().to(torch.int64)  # the file holds int64 counts whatever the memory held (spec 5.3)
        offset, stored = _stored_range(counts)
        rows = sample.rows if sample.rows is not None else torch.zeros((0, observation.in_features))
        dtype = str(rows.dtype).removeprefix("torch.")
        if dtype not in HOLDOUT_DTYPES:
            rows, dtype = rows.to(torch.float32), "float32"
        info = LayerInfo(observation.component, observation.module, observation.in_features,
                         observation.out_features, sketch.tokens, observation.calls, offset, stored,
                         int(rows.shape[0]), dtype)
        layers[layer_key(info.component, info.module)] = info.to_dict()
        fields = {
            "counts": counts[:, offset:offset + stored].contiguous(),
            "absmax": sketch.absmax.cpu().contiguous(),
            "absmin": sketch.absmin.cpu().contiguous(),
            "nonfinite": sketch.nonfinite.cpu().contiguous(),
            "holdout": rows.cpu().contiguous(),
            "holdout_ids": sample.ids.cpu().contiguous(),
        }
        for field, tensor in fields.items():
            tensors[tensor_name(info.component, info.module, field)] = tensor
    header = {
        "format": STATS_FORMAT_NAME,
        "format_version": f"{STATS_MAJOR}.{STATS_MINOR}",
        "producer": {"name": "hif4fmt", "version": __version__},
        "sketch": grid.to_dict(),
        "protocol": protocol.to_dict(),
        "prompts": prompts,
        "base": base,
        "holdout": {"rows_per_layer": holdout_rows, "selection": HOLDOUT_SELECTION},
        "layers": dict(sorted(layers.items())),
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    _atomic_save(tensors, {STATS_METADATA_KEY: text}, path)
    return header


# --- reading ------------------------------------------------------------------------------------------


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise StatsFormatError(f"{path}: {message}")


def _int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _parse_layer(path: Path, key: str, entry: Any, grid: SketchGrid, rows_per_layer: int) -> LayerInfo:
    """Return the validated entry of one layer (spec 5.2.4); keys a later minor version adds are ignored."""
    where = f"layer {key}"
    missing = [name for name in LAYER_KEYS if not isinstance(entry, dict) or name not in entry]
    _require(not missing, path, f"{where}: expected the keys {list(LAYER_KEYS)}, missing {missing}")
    _require(isinstance(entry["component"], str) and isinstance(entry["module"], str)
             and layer_key(entry["component"], entry["module"]) == key, path,
             f"{where}: component/module {entry.get('component')!r}/{entry.get('module')!r} do not match the key")
    for name, low, high in (("in_features", 1, MAX_CHANNELS), ("out_features", 1, MAX_CHANNELS),
                            ("tokens", 0, (1 << 63) - 1), ("calls", 0, (1 << 63) - 1),
                            ("bin_offset", 0, grid.bins), ("stored_bins", 0, grid.bins),
                            ("holdout_rows", 0, MAX_HOLDOUT_ROWS)):
        _require(_int(entry[name], low, high), path, f"{where}: {name} {entry[name]!r} must be an integer in "
                                                     f"[{low}, {high}]")
    _require(entry["bin_offset"] + entry["stored_bins"] <= grid.bins, path,
             f"{where}: bins [{entry['bin_offset']}, {entry['bin_offset'] + entry['stored_bins']}) exceed the "
             f"grid's {grid.bins} bins")
    _require((entry["tokens"] == 0) == (entry["stored_bins"] == 0), path,
             f"{where}: {entry['tokens']} tokens but {entry['stored_bins']} stored bins")
    _require(entry["holdout_rows"] <= rows_per_layer, path,
             f"{where}: holdout_rows {entry['holdout_rows']} exceeds holdout.rows_per_layer {rows_per_layer}")
    _require(isinstance(entry["holdout_dtype"], str) and entry["holdout_dtype"] in HOLDOUT_DTYPES, path,
             f"{where}: holdout_dtype {entry['holdout_dtype']!r} must be one of {', '.join(HOLDOUT_DTYPES)}")
    return LayerInfo(**{name: entry[name] for name in LAYER_KEYS})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (the writer never emits NaN or Infinity)")


def _parse_header(path: Path, text: str) -> StatsHeader:
    """Return the validated header; ``StatsFormatError`` names the first field that is wrong."""
    _require(len(text.encode("utf-8")) <= MAX_STATS_HEADER_BYTES, path,
             f"header of {len(text)} characters exceeds {MAX_STATS_HEADER_BYTES} bytes")
    try:
        header = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise StatsFormatError(f"{path}: the {STATS_METADATA_KEY} header is not valid JSON: {exc}") from None
    _require(isinstance(header, dict), path, "header must be a JSON object")
    missing = [key for key in HEADER_KEYS if key not in header]
    _require(not missing, path, f"header misses {missing}; the file is damaged or was not written by hif4fmt")
    _require(header["format"] == STATS_FORMAT_NAME, path,
             f"format {header['format']!r}: expected {STATS_FORMAT_NAME!r}")
    version = header["format_version"]
    _require(isinstance(version, str) and version.count(".") == 1 and all(p.isdigit() for p in version.split(".")),
             path, f"format_version {version!r}: expected 'MAJOR.MINOR'")
    major = int(version.split(".")[0])
    _require(major == STATS_MAJOR, path, f"format_version {version}: this hif4fmt reads major {STATS_MAJOR} "
                                         f"only; recalibrate or upgrade hif4fmt")
    sketch = header["sketch"]
    _require(isinstance(sketch, dict), path, "sketch must be an object")
    _require(sketch.get("kind") == SKETCH_KIND and sketch.get("count_dtype") == COUNT_DTYPE, path,
             f"sketch kind {sketch.get('kind')!r} with {sketch.get('count_dtype')!r} counts: this hif4fmt reads "
             f"{SKETCH_KIND!r} with {COUNT_DTYPE!r} counts only")
    grid = SketchGrid(sketch.get("mantissa_bits"), sketch.get("exponent_min"), sketch.get("exponent_max"))
    grid.validate(StatsFormatError, f"{path}: sketch")
    _require(sketch.get("bins") == grid.bins, path, f"sketch bins {sketch.get('bins')!r}: the parameters give "
                                                    f"{grid.bins}")
    protocol = CalibrationProtocol.from_dict(header["protocol"], StatsFormatError)
    prompts = header["prompts"]
    _require(isinstance(prompts, dict) and isinstance(prompts.get("sha256"), str)
             and _int(prompts.get("count"), 1, 1 << 19), path, "prompts must hold count and sha256")
    _require(prompts["count"] == protocol.num_prompts, path,
             f"prompts count {prompts['count']} differs from protocol num_prompts {protocol.num_prompts}")
    base = header["base"]
    _require(base is None or (isinstance(base, dict) and isinstance(base.get("fingerprint"), str)
                              and isinstance(base.get("components"), dict)), path,
             "base must be null or hold fingerprint and components")
    holdout = header["holdout"]
    _require(isinstance(holdout, dict) and _int(holdout.get("rows_per_layer"), 0, MAX_HOLDOUT_ROWS), path,
             f"holdout must be an object whose rows_per_layer is an integer in [0, {MAX_HOLDOUT_ROWS}]")
    _require(isinstance(header["producer"], dict), path, "producer must be an object")
    entries = header["layers"]
    _require(isinstance(entries, dict) and len(entries) <= MAX_STATS_LAYERS, path,
             f"layers must be an object of at most {MAX_STATS_LAYERS} entries")
    layers = {}
    for key, entry in entries.items():
        info = _parse_layer(path, key, entry, grid, holdout["rows_per_layer"])
        layers[(info.component, info.module)] = info
    return StatsHeader(version, header["producer"], grid, protocol, header["protocol"], prompts, base,
                       header["holdout"], layers)


def _expected_tensors(info: LayerInfo) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return {tensor name: (safetensors dtype, shape)} that layer ``info`` must have (spec 5.3)."""
    channels = info.in_features
    holdout_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[info.holdout_dtype]
    shapes = {
        "counts": ("I64", (channels, info.stored_bins)),
        "absmax": ("F32", (channels,)),
        "absmin": ("F32", (channels,)),
        "nonfinite": ("I64", (channels,)),
        "holdout": (holdout_dtype, (info.holdout_rows, channels)),
        "holdout_ids": ("I64", (info.holdout_rows,)),
    }
    return {tensor_name(info.component, info.module, field): spec for field, spec in shapes.items()}


def _check_extremes(where: str, grid: SketchGrid, counts: torch.Tensor, absmin: torch.Tensor,
                    absmax: torch.Tensor) -> None:
    """Raise ``StatsFormatError`` unless each channel's exact min / max falls in its first / last non-empty bin.

    The bin function is monotone and the min and max are samples, so this holds for every file the
    writer emits; a damaged absmin/absmax (or counts) breaks it. ``counts`` int64 (C, bins), all rows > 0.
    """
    occupied = counts > 0
    first = occupied.to(torch.int8).argmax(1)
    last = grid.bins - 1 - occupied.flip(1).to(torch.int8).argmax(1)
    for name, value, expected in (("absmin", absmin, first), ("absmax", absmax, last)):
        bins = grid.bin_indices(value.to(torch.float32).view(torch.int32) & FLOAT32_ABS_MASK)
        wrong = torch.nonzero(bins != expected).flatten()
        if wrong.numel():
            channel = int(wrong[0])
            edge = "first" if name == "absmin" else "last"
            raise StatsFormatError(f"{where}: channel {channel} {name} {float(value[channel])!r} lies in bin "
                                   f"{int(bins[channel])} but its histogram's {edge} non-empty bin is "
                                   f"{int(expected[channel])}; the file is damaged")


class StatsFile:
    """An opened statistics file: the validated ``header`` and ``load_layer`` for one layer at a time."""

    def __init__(self, path: Path, header: StatsHeader, handle: Any):
        self.path = path
        self.header = header
        self._handle = handle

    def load_layer(self, component: str, module: str) -> LayerStats:
        """Return one layer's statistics, checked (spec 5.4): counts >= 0 and summing to ``tokens`` in every
        channel; absmin <= absmax, neither NaN, each in the first / last non-empty bin of its channel;
        non-finite counts in [0, overflow-bin count] and > 0 exactly where absmax is inf; held-out ids in
        strictly ascending key order. ``StatsFormatError`` otherwise."""
        info = self.header.layers.get((component, module))
        if info is None:
            raise StatsFormatError(f"{self.path}: no statistics for {component}/{module}; the file was made "
                                   f"for other layers; recalibrate with this base")
        where = f"{self.path}: layer {layer_key(component, module)}"
        try:
            loaded = {field: self._handle.get_tensor(tensor_name(component, module, field))
                      for field in ("counts", "absmax", "absmin", "nonfinite", "holdout", "holdout_ids")}
        except Exception as exc:  # safetensors raises its own error type for damaged data
            raise StatsFormatError(f"{where}: cannot read its tensors: {exc}") from None
        grid = self.header.grid
        stored = loaded["counts"]
        if bool((stored < 0).any()):
            raise StatsFormatError(f"{where}: negative histogram counts; the file is damaged")
        counts = torch.zeros((info.in_features, grid.bins), dtype=torch.int64)
        counts[:, info.bin_offset:info.bin_offset + info.stored_bins] = stored
        sums = counts.sum(1)
        if info.tokens and bool((sums != info.tokens).any()):
            channel = int(torch.nonzero(sums != info.tokens)[0])
            raise StatsFormatError(f"{where}: channel {channel} histogram sums to {int(sums[channel])} but "
                                   f"{info.tokens} tokens were recorded; the file is damaged")
        absmax, absmin, nonfinite = loaded["absmax"], loaded["absmin"], loaded["nonfinite"]
        if info.tokens:
            if bool(torch.isnan(absmax).any() | torch.isnan(absmin).any() | (absmin < 0).any()
                    | (absmin > absmax).any()):
                raise StatsFormatError(f"{where}: exact min/max of |x| are inconsistent (NaN, negative or "
                                       f"min > max); the file is damaged")
            if bool(((nonfinite < 0) | (nonfinite > counts[:, -1])).any()
                    | ((nonfinite > 0) != torch.isinf(absmax)).any()):
                raise StatsFormatError(f"{where}: non-finite counts are negative, exceed the overflow bin, or "
                                       f"disagree with an infinite absmax; the file is damaged")
            _check_extremes(where, grid, counts, absmin, absmax)
        ids = loaded["holdout_ids"]
        keys = splitmix64(ids)
        if ids.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise StatsFormatError(f"{where}: held-out row ids are not in ascending key order; the file is damaged")
        return LayerStats(info, grid, counts, absmax, absmin, nonfinite, loaded["holdout"], ids)

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> "StatsFile":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_stats(path: str | os.PathLike) -> StatsFile:
    """Open and validate a statistics file: header, tensor names, dtypes and shapes (not yet the values).

    Raises ``StatsFormatError`` for a missing, truncated, non-safetensors or non-hif4fmt file, a bad
    header, or a tensor missing, extra, or of the wrong dtype or shape.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(SAFETENSORS_LENGTH_BYTES)
    except OSError as exc:
        raise StatsFormatError(f"{path}: cannot read the statistics file: {exc}") from None
    _require(len(prefix) == SAFETENSORS_LENGTH_BYTES, path,
             f"{size} bytes is too short for a statistics file (safetensors)")
    header_length = int.from_bytes(prefix, "little")
    _require(header_length <= min(MAX_SAFETENSORS_HEADER_BYTES, size - SAFETENSORS_LENGTH_BYTES), path,
             f"safetensors header length {header_length} exceeds the file ({size} bytes) or "
             f"{MAX_SAFETENSORS_HEADER_BYTES} bytes; the file is truncated or not a statistics file")
    try:
        handle = safe_open(str(path), framework="pt")
        metadata = handle.metadata() or {}
        names = set(handle.keys())
        specs = {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                 for name in names}
    except Exception as exc:  # safetensors' own error type for malformed files
        raise StatsFormatError(f"{path}: not a valid safetensors file: {exc}") from None
    text = metadata.get(STATS_METADATA_KEY)
    _require(isinstance(text, str), path, f"no '{STATS_METADATA_KEY}' metadata: not a hif4fmt statistics file "
                                          f"(write one with `hif4fmt calibrate`)")
    header = _parse_header(path, text)
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for info in header.layers.values():
        expected.update(_expected_tensors(info))
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    _require(not missing, path, f"{len(missing)} tensors listed in the header are missing, first {missing[:1]}")
    _require(not extra, path, f"{len(extra)} tensors not described by the header, first {extra[:1]}")
    for name, (dtype, shape) in expected.items():
        _require(specs[name] == (dtype, shape), path,
                 f"tensor {name}: expected {dtype} {list(shape)}, found {specs[name][0]} {list(specs[name][1])}")
    return StatsFile(path, header, handle)
