"""Canonical msgpack for the .hif4 header: one byte string per value, and a bounded, strict decoder.

Why this module exists: byte-identical rebuilds and a header checksum that means something need exactly
one encoding of every header (spec 4.1): maps with string keys sorted by code point, integers in their
shortest msgpack form, floats always float64, strings as msgpack str, no bin, no ext, no NaN or
infinity. The decoder bounds every length before msgpack allocates, counts maps, arrays and values as
they are decoded (so a small hostile header cannot expand into gigabytes of Python objects), refuses
every other type, and re-encodes what it decoded: a header that is not already canonical is refused, so
two different files can never mean the same state.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import msgpack
import numpy as np

from hif4fmt.constants import (
    HEADER_OFFSET,
    MAX_CONTAINER_ENTRIES,
    MAX_HEADER_BYTES,
    MAX_HEADER_CONTAINERS,
    MAX_HEADER_VALUES,
    MAX_INT,
    MAX_NESTING_DEPTH,
    MAX_STRING_BYTES,
    MIN_INT,
)
from hif4fmt.errors import Hif4Error

ErrorFactory = Callable[[str], Hif4Error]


class _Budget:
    """Counts maps, arrays and values of one header; raises ``error`` past the limits of spec 4.1.

    Values are counted as every map key, every map value and every array entry (the header map itself is
    a container, not a value). The decoder calls ``on_map`` / ``on_array`` as msgpack finishes each container, so decoding stops
    within one container (at most 1,000,000 entries) of the limit.
    """

    def __init__(self, where: str, error: ErrorFactory):
        self.where, self.error = where, error
        self.containers = 0
        self.values = 0

    def _count(self, entries: int) -> None:
        self.containers += 1
        self.values += entries
        if self.containers > MAX_HEADER_CONTAINERS:
            raise self.error(f"{self.where}: header holds more than {MAX_HEADER_CONTAINERS} maps and arrays")
        if self.values > MAX_HEADER_VALUES:
            raise self.error(f"{self.where}: header holds more than {MAX_HEADER_VALUES} values")

    def on_map(self, mapping: dict) -> dict:
        self._count(2 * len(mapping))
        return mapping

    def on_array(self, items: list) -> list:
        self._count(len(items))
        return items


def to_plain(value: Any, where: str, error: ErrorFactory, depth: int = 1, budget: _Budget | None = None) -> Any:
    """Return ``value`` as canonical plain types (dicts with sorted str keys, lists, int, float, str...).

    numpy scalars become Python scalars and tuples become lists. Anything else, NaN/infinity, an integer
    outside int64, a string over the limit or nesting deeper than the limit raises ``error(message)``
    naming ``where`` (a dotted path into the header). ``depth`` is the nesting level a map or array at
    ``where`` would have (the header map is 1); scalars do not count (spec 4.1). ``budget`` counts maps,
    arrays and values across calls (``pack_canonical`` passes one per header).
    """
    if isinstance(value, (list, tuple, dict)) and depth > MAX_NESTING_DEPTH:
        raise error(f"{where}: nested deeper than {MAX_NESTING_DEPTH} maps/arrays")
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, np.integer)):
        number = int(value)
        if not MIN_INT <= number <= MAX_INT:
            raise error(f"{where}: integer {number} is outside int64")
        return number
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise error(f"{where}: {number} is not finite; the header holds finite numbers only")
        return number
    if isinstance(value, str):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
            raise error(f"{where}: string longer than {MAX_STRING_BYTES} bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"{where}: string is not valid Unicode (lone surrogate)") from None
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_CONTAINER_ENTRIES:
            raise error(f"{where}: array of {len(value)} entries exceeds {MAX_CONTAINER_ENTRIES}")
        if budget is not None:
            budget.on_array(value)
        return [to_plain(item, f"{where}[{i}]", error, depth + 1, budget) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if len(value) > MAX_CONTAINER_ENTRIES:
            raise error(f"{where}: map of {len(value)} entries exceeds {MAX_CONTAINER_ENTRIES}")
        for key in value:
            if not isinstance(key, str):
                raise error(f"{where}: map key {key!r} is {type(key).__name__}; keys must be strings")
            to_plain(key, f"{where} key", error, depth + 1)  # length and Unicode checks
        if budget is not None:
            budget.on_map(value)
        return {key: to_plain(value[key], f"{where}.{key}", error, depth + 1, budget) for key in sorted(value)}
    raise error(f"{where}: {type(value).__name__} is not allowed in the header "
                f"(allowed: map, array, str, int, float, bool, nil)")


def pack_canonical(value: Any, error: ErrorFactory) -> bytes:
    """Return the canonical msgpack bytes of ``value`` (spec 4.1); ``error`` builds the exception."""
    budget = _Budget("header", error)
    plain = to_plain(value, "header", error, budget=budget)
    return msgpack.packb(plain, use_bin_type=True, use_single_float=False, strict_types=False)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed in the header")


def unpack_canonical(data: bytes, where: str, error: ErrorFactory) -> dict[str, Any]:
    """Return the header map decoded from canonical msgpack ``data``; anything else raises ``error``.

    ``where`` prefixes messages (normally the file name).
    """
    if len(data) > MAX_HEADER_BYTES:
        raise error(f"{where}: header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    budget = _Budget(where, error)
    try:
        value = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0,
            max_str_len=MAX_STRING_BYTES, max_bin_len=0, max_ext_len=0,
            max_array_len=MAX_CONTAINER_ENTRIES, max_map_len=MAX_CONTAINER_ENTRIES,
            object_hook=budget.on_map, list_hook=budget.on_array,
        )
    except Hif4Error:
        raise  # the budget's own error
    except Exception as exc:  # msgpack raises ValueError, TypeError, its own FormatError/StackError...
        raise error(f"{where}: header (file bytes {HEADER_OFFSET}..{HEADER_OFFSET + len(data)}) is not valid msgpack: "
                    f"{type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{where}: header must be a msgpack map, found {type(value).__name__}")
    _check_types(value, "header", where, error, 1)  # also: int64 range, keys sorted, so no copy is needed
    encoded = msgpack.packb(value, use_bin_type=True, use_single_float=False)
    if encoded != data:
        first = next((i for i, (a, b) in enumerate(zip(encoded, data)) if a != b), min(len(encoded), len(data)))
        raise error(f"{where}: header is not canonical msgpack (spec 4.1): it differs from its canonical "
                    f"re-encoding at header byte {first} ({len(data)} bytes stored, {len(encoded)} canonical); "
                    f"rewrite the file with hif4fmt")
    return value


def _check_types(value: Any, path: str, where: str, error: ErrorFactory, depth: int) -> None:
    """Refuse decoded values the header may not hold (bytes, ext objects, non-string keys, NaN)."""
    if isinstance(value, (dict, list)) and depth > MAX_NESTING_DEPTH:
        raise error(f"{where}: {path}: nested deeper than {MAX_NESTING_DEPTH} maps/arrays")
    if isinstance(value, dict):
        keys = list(value)
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{where}: {path}: map key of type {type(key).__name__}; keys must be strings")
            _check_types(item, f"{path}.{key}", where, error, depth + 1)
        if keys != sorted(keys):
            first = next(k for k, s in zip(keys, sorted(keys)) if k != s)
            raise error(f"{where}: header is not canonical msgpack (spec 4.1): keys of {path} are not sorted "
                        f"by code point (first out of place: {first!r}); rewrite the file with hif4fmt")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_types(item, f"{path}[{i}]", where, error, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{where}: {path}: {value} is not finite")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not MIN_INT <= value <= MAX_INT:
            raise error(f"{where}: {path}: integer {value} is outside int64")
    elif value is not None and not isinstance(value, (bool, int, str)):
        raise error(f"{where}: {path}: {type(value).__name__} is not allowed in the header")
