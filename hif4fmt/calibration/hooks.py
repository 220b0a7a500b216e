"""Forward hooks that feed every target linear's input activations into its sketch and held-out sample.

Why this module exists: calibration observes the inputs of the quantized linears while the real
pipeline runs; the hook is the only place that sees them. Per layer it keeps a ``ChannelSketch``
(histogram + exact max/min, see ``sketch``) and a ``HoldoutSample``: up to R input rows chosen by a
rule that does not depend on how records are split across processes (spec 4): every row gets an id
``record << 44 | call << 24 | token`` (record = global prompt index, call = how many times this layer
ran before in this record, token = row in the flattened (batch x tokens) activation), the key is
splitmix64(id), and the sample is the R rows with the smallest keys. splitmix64 is a bijection, so
keys are unique and the bottom-R of a union is the bottom-R of the per-process bottom-R sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from hif4fmt.calibration.constants import (
    CALL_ID_BITS,
    RECORD_ID_BITS,
    SPLITMIX64_GAMMA,
    SPLITMIX64_MUL1,
    SPLITMIX64_MUL2,
    SPLITMIX64_SHIFTS,
    TOKEN_ID_BITS,
)
from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid
from hif4fmt.errors import CalibrationError
from hif4fmt.targets import ComponentPlan

_U64 = 1 << 64


def _signed64(value: int) -> int:
    """Return the int64 two's-complement reading of an unsigned 64-bit constant."""
    return value - _U64 if value >= 1 << 63 else value


def _logical_shift_right(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Return x >>> shift for int64 tensors read as unsigned 64-bit (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def splitmix64(ids: torch.Tensor) -> torch.Tensor:
    """Return splitmix64(ids) as int64 (the unsigned result's bit pattern); ``ids`` int64, any shape.

    Wrapping int64 arithmetic equals unsigned arithmetic mod 2**64; checked against a pure-Python
    reference in tests. Keys are compared as signed int64: any total order works, it only has to be fixed.
    """
    first, second, third = SPLITMIX64_SHIFTS
    z = ids.to(torch.int64) + _signed64(SPLITMIX64_GAMMA)
    z = (z ^ _logical_shift_right(z, first)) * _signed64(SPLITMIX64_MUL1)
    z = (z ^ _logical_shift_right(z, second)) * _signed64(SPLITMIX64_MUL2)
    return z ^ _logical_shift_right(z, third)


def row_ids(record: int, call: int, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return int64 (rows,) ids ``record << 44 | call << 24 | token``; ``CalibrationError`` past the limits."""
    for name, value, bits in (("record", record, RECORD_ID_BITS), ("call", call, CALL_ID_BITS),
                              ("token row", rows - 1, TOKEN_ID_BITS)):
        if not 0 <= value < 1 << bits:
            raise CalibrationError(f"held-out row ids: {name} {value} exceeds {(1 << bits) - 1} "
                                   f"({bits} bits); use fewer prompts, steps or tokens per call")
    base = (record << (CALL_ID_BITS + TOKEN_ID_BITS)) | (call << TOKEN_ID_BITS)
    return torch.arange(rows, dtype=torch.int64, device=device) + base


class HoldoutSample:
    """Up to ``capacity`` input rows of one layer with the smallest splitmix64 keys (activation dtype).

    rows (n, C) in the first activation dtype seen, ids int64 (n,), keys int64 (n,) ascending. They live
    on ``device``, or (None) on the device of the first activations offered, so that selecting rows on a
    GPU never waits for it; readers move them with ``.cpu()``.
    """

    def __init__(self, capacity: int, channels: int, device: torch.device | str | None = None):
        self.capacity = capacity
        self.channels = channels
        self.device = None if device is None else torch.device(device)
        self.rows: torch.Tensor | None = None
        self.ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.keys = torch.zeros(0, dtype=torch.int64, device=self.device)

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.rows is None else self.rows.dtype

    def offer(self, x: torch.Tensor, record: int, call: int) -> None:
        """Consider every row of ``x`` (..., C) as a candidate; keep the ``capacity`` smallest keys.

        Work per call: one id range, splitmix64, one top-k on the activations' device, then a merge of
        at most 2 x capacity rows; no host-device synchronisation when the sample lives with ``x``.
        """
        if self.capacity == 0:
            return
        rows = x.detach().reshape(-1, self.channels)
        if self.rows is not None and rows.dtype != self.rows.dtype:
            raise CalibrationError(f"held-out rows: activations changed dtype from {self.rows.dtype} to "
                                   f"{rows.dtype} between calls; run the pipeline in one dtype")
        ids = row_ids(record, call, rows.shape[0], rows.device)
        keys = splitmix64(ids)
        if keys.numel() > self.capacity:
            keys, picked = torch.topk(keys, self.capacity, largest=False, sorted=False)
            ids = ids[picked]
            rows = rows[picked]
        self._merge(rows, ids, keys)

    def _merge(self, rows: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Merge candidate rows into the sample, keeping the ``capacity`` smallest keys in ascending order."""
        if self.device is None:
            self.device = rows.device
            self.ids, self.keys = self.ids.to(self.device), self.keys.to(self.device)
        rows, ids, keys = rows.to(self.device), ids.to(self.device), keys.to(self.device)
        all_rows = rows if self.rows is None else torch.cat([self.rows, rows])
        all_ids = torch.cat([self.ids, ids])
        all_keys = torch.cat([self.keys, keys])
        order = torch.argsort(all_keys)[: self.capacity]  # keys are unique: the order is total
        self.rows, self.ids, self.keys = all_rows[order].contiguous(), all_ids[order], all_keys[order]

    def merge_(self, rows: torch.Tensor, ids: torch.Tensor) -> "HoldoutSample":
        """Merge rows + ids held elsewhere (e.g. another process) into this sample and return self."""
        if rows.shape[0]:
            if self.rows is not None and rows.dtype != self.rows.dtype:
                raise CalibrationError(f"held-out rows: cannot merge {rows.dtype} rows into {self.rows.dtype}")
            self._merge(rows, ids, splitmix64(ids))
        return self


@dataclass
class LayerObservation:
    """Everything collected for one target linear: where it is, its sketch, its sample, its call count."""

    component: str
    module: str
    in_features: int
    out_features: int
    sketch: ChannelSketch
    holdout: HoldoutSample
    calls: int = 0  # forward calls over all records (this process)
    calls_in_record: int = 0  # forward calls since ``begin_record``


class ActivationCollector:
    """Hooks on every quantized linear of the given transformers; ``observations`` keyed (component, module).

    Use ``begin_record(index)`` before each calibration record (global prompt index) and ``remove()``
    when done. Statistics live on ``sketch_device`` ("cpu", or None for the activations' device);
    ``count_dtype`` torch.int32 halves the histograms' memory (exact: see ``ChannelSketch``). The hook
    does a fixed amount of Python work per call, whatever the channel count, and no host-device
    synchronisation when the statistics live with the activations (the default).
    """

    def __init__(self, models: dict[str, Any], plans: dict[str, ComponentPlan], grid: SketchGrid,
                 holdout_rows: int, sketch_device: torch.device | str | None = None,
                 count_dtype: torch.dtype = torch.int64):
        self.grid = grid
        self.record: int | None = None
        self.observations: dict[tuple[str, str], LayerObservation] = {}
        self._handles: list[Any] = []
        for component, plan in sorted(plans.items()):
            modules = dict(models[component].named_modules())
            for layer in plan.quantized:
                module = modules[layer.module]
                device = sketch_device if sketch_device is not None else _parameter_device(module)
                observation = LayerObservation(
                    component, layer.module, layer.in_features, layer.out_features,
                    ChannelSketch(grid, layer.in_features, device, count_dtype),
                    HoldoutSample(holdout_rows, layer.in_features, sketch_device))
                self.observations[(component, layer.module)] = observation
                self._handles.append(module.register_forward_pre_hook(self._hook(observation)))

    def _hook(self, observation: LayerObservation):
        def observe(module: Any, args: tuple) -> None:
            if self.record is None:
                raise CalibrationError("ActivationCollector: call begin_record(index) before running the model")
            x = args[0]
            observation.sketch.update(x)
            observation.holdout.offer(x, self.record, observation.calls_in_record)
            observation.calls_in_record += 1
            observation.calls += 1
        return observe

    def begin_record(self, index: int) -> None:
        """Start calibration record ``index`` (its global prompt index): per-record call counts restart."""
        self.record = index
        for observation in self.observations.values():
            observation.calls_in_record = 0

    def remove(self) -> None:
        """Remove every hook (the models run unobserved afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def layers(self) -> Iterable[LayerObservation]:
        """Return the observations sorted by (component, module)."""
        return (self.observations[key] for key in sorted(self.observations))


def _parameter_device(module: Any) -> torch.device:
    """Return the device of a module's weight; ``meta`` (offloaded) falls back to CPU."""
    device = module.weight.device
    return torch.device("cpu") if device.type == "meta" else device
