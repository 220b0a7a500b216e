"""The in-memory form of a .hif4 state: plain frozen records, no I/O.

Why this module exists: the writer, the reader, ``verify``, ``diff``, the builder and the runtime all
speak in these records, so they are defined once, apart from the byte format. A ``State`` sorts its
layers canonically (component, then module) on construction, so the order they were built in never
changes the file. Masks are float32 ``(in_features,)`` in memory whatever dtype they are stored in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hif4fmt import __version__
from hif4fmt.recipe import Recipe

PRODUCER_NAME = "hif4fmt"


def default_producer() -> dict[str, Any]:
    """Return the producer map written when none is given: {"name": "hif4fmt", "version": ...}."""
    return {"name": PRODUCER_NAME, "version": __version__}


@dataclass(frozen=True)
class MaskStats:
    """Min, max and mean (float64) of one mask's stored values, kept in the header for ``inspect``."""

    min: float
    max: float
    mean: float


@dataclass(frozen=True)
class MaskRecord:
    """Where a mask lives in the file: tensor name, dtype, shape, byte offsets in the data section, sha256."""

    tensor: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset from the start of the data section (spec 3.3)
    end: int
    sha256: str

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class LayerRecipe:
    """The recipe one layer's mask was made with (format 1.1, layer key ``recipe``): provenance only.

    ``statistic`` "percentile" (then ``percentile`` in (0, 100]) or "max" (``percentile`` None);
    ``alpha`` in [0, 1]. The mask values are what a runtime applies; this says how they were chosen
    (e.g. by ``hif4fmt build --search``), so it may differ from the state's global recipe.
    """

    statistic: str
    percentile: float | None
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        """Return the header form: ``{"alpha", "percentile", "statistic"}`` with floats as floats."""
        return {"alpha": float(self.alpha),
                "percentile": None if self.percentile is None else float(self.percentile),
                "statistic": self.statistic}


@dataclass(frozen=True)
class TensorDigest:
    """One base tensor as a state records it (format 1.1, ``base.tensors``): dtype, shape, spec 6.2 digest."""

    dtype: str
    shape: tuple[int, ...]
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """One HiF4 W4A4 linear: where it is, its shape, its mask and the digest of its base weight.

    ``mask`` is float32 ``(in_features,)``, or None when the state was read header-only.
    ``weight_fingerprint`` is the hex tensor digest (spec 6.2) of ``<module>.weight`` in the base.
    ``mask_stats`` and ``record`` are filled by the reader; the writer recomputes them and ignores
    what is passed, and they take no part in equality.
    ``recipe`` (1.1) is how this layer's mask was chosen, or None when it is the state's recipe;
    ``rotation`` (1.1) is None (identity) or ``"hadamard-64"``: the runtime computes
    ``HiF4(R(x * m)) @ HiF4(R(W / m)).T + b`` with R = blockdiag(H64 / 8) (``hif4fmt.codec.rotation``).
    """

    component: str
    module: str
    in_features: int
    out_features: int
    mask: np.ndarray | None
    weight_fingerprint: str
    mask_stats: MaskStats | None = field(default=None, compare=False)
    record: MaskRecord | None = field(default=None, compare=False)
    recipe: LayerRecipe | None = None
    rotation: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Return (component, module), the canonical sort key."""
        return (self.component, self.module)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedLayer):
            return NotImplemented
        if (self.component, self.module, self.in_features, self.out_features, self.weight_fingerprint,
                self.recipe, self.rotation) != (other.component, other.module, other.in_features,
                                                other.out_features, other.weight_fingerprint, other.recipe,
                                                other.rotation):
            return False
        if self.mask is None or other.mask is None:
            return self.mask is None and other.mask is None
        return (self.mask.dtype == other.mask.dtype and self.mask.shape == other.mask.shape
                and self.mask.tobytes() == other.mask.tobytes())

    __hash__ = None  # type: ignore[assignment]  (holds an array)


@dataclass(frozen=True, order=True)
class ExcludedLayer:
    """A linear kept in high precision, and why (e.g. "boundary layer", "retained block")."""

    component: str
    module: str
    reason: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.component, self.module)


@dataclass(frozen=True)
class BaseBinding:
    """The base checkpoint a state belongs to: fingerprint algorithm, combined and per-component digests.

    ``total_bytes`` is the raw tensor bytes of the bound components. ``hub_hints`` (e.g. repo_id,
    revision) are shown to people but never trusted: only the fingerprint decides a match.
    Format 1.1 adds two optional records, informative like ``hub_hints`` (the fingerprint still decides):
    ``layout`` ``{"name", "pipeline", "transformers"}`` (``hif4fmt.layouts.describe_layout``), so a
    mismatch can name both layouts; ``tensors`` component -> tensor name -> ``TensorDigest`` of every
    tensor of the bound components, so a mismatch can name each tensor that changed, appeared or went.
    """

    algorithm: str
    fingerprint: str
    components: dict[str, str]
    total_bytes: int
    hub_hints: dict[str, str] = field(default_factory=dict)
    layout: dict[str, Any] | None = None
    tensors: dict[str, dict[str, TensorDigest]] = field(default_factory=dict)

    @classmethod
    def from_fingerprint(cls, fingerprint: Any, hub_hints: dict[str, str] | None = None, *,
                         base: Any = None, layout: dict[str, Any] | None = None) -> "BaseBinding":
        """Return the binding for a ``BaseFingerprint`` (from ``hif4fmt.fingerprint.fingerprint_base``).

        With ``base`` (the ``BaseCheckpoint`` that was fingerprinted) every tensor's dtype, shape and
        digest is recorded too (``tensors``, format 1.1); ``layout`` is recorded as given.
        """
        tensors: dict[str, dict[str, TensorDigest]] = {}
        if base is not None:
            for name, component in sorted(fingerprint.components.items()):
                checkpoint = base.components[name]
                table = {}
                for tensor, digest in sorted(component.tensors.items()):
                    dtype, shape, _ = checkpoint.tensor_info(tensor)
                    table[tensor] = TensorDigest(dtype, tuple(shape), digest)
                tensors[name] = table
        return cls(fingerprint.algorithm, fingerprint.fingerprint,
                   {name: c.digest for name, c in sorted(fingerprint.components.items())},
                   fingerprint.total_bytes, dict(sorted((hub_hints or {}).items())),
                   None if layout is None else dict(layout), tensors)

    def to_dict(self) -> dict[str, Any]:
        """Return the header form (spec 4.6); the 1.1 keys only when present."""
        result = {"algorithm": self.algorithm, "fingerprint": self.fingerprint,
                  "components": dict(sorted(self.components.items())), "total_bytes": self.total_bytes,
                  "hub_hints": dict(sorted(self.hub_hints.items()))}
        if self.layout is not None:
            result["layout"] = {"name": self.layout["name"], "pipeline": self.layout["pipeline"],
                                "transformers": list(self.layout["transformers"])}
        if self.tensors:
            result["tensors"] = {component: {name: digest.to_dict() for name, digest in sorted(table.items())}
                                 for component, table in sorted(self.tensors.items())}
        return result


@dataclass(frozen=True)
class StateLayout:
    """Byte layout of a state file as read: sizes and offsets (bytes), and the version in its preamble."""

    format_version: str
    file_bytes: int
    header_bytes: int
    data_offset: int
    data_bytes: int
    tensor_count: int


@dataclass(frozen=True)
class State:
    """A complete .hif4 state: recipe, calibration provenance, base binding, quantized/excluded layers.

    ``calibration`` is a free-form map (prompt count, seed, resolution, ...) written verbatim.
    ``producer`` defaults to {"name": "hif4fmt", "version": <package version>}. ``extra`` holds
    top-level header keys this version does not know (spec 4.2); they are written back unchanged.
    ``layout`` is filled by the reader and takes no part in equality.
    """

    recipe: Recipe
    calibration: dict
    base: BaseBinding
    layers: tuple[QuantizedLayer, ...]
    excluded: tuple[ExcludedLayer, ...]
    producer: dict | None = None
    extra: dict | None = None
    layout: StateLayout | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(self.layers, key=lambda layer: layer.key)))
        object.__setattr__(self, "excluded", tuple(sorted(self.excluded, key=lambda layer: layer.key)))
        if self.producer is None:
            object.__setattr__(self, "producer", default_producer())
        if self.extra is None:
            object.__setattr__(self, "extra", {})

    @property
    def components(self) -> tuple[str, ...]:
        """Return the sorted component names: the bound base components plus any named by a layer."""
        names = set(self.base.components) | {l.component for l in self.layers} | {l.component for l in self.excluded}
        return tuple(sorted(names))

    def layers_of(self, component: str) -> tuple[QuantizedLayer, ...]:
        """Return the quantized layers of ``component`` in canonical (module) order."""
        return tuple(layer for layer in self.layers if layer.component == component)

    def excluded_of(self, component: str) -> tuple[ExcludedLayer, ...]:
        """Return the excluded layers of ``component`` in canonical (module) order."""
        return tuple(layer for layer in self.excluded if layer.component == component)

    def layer(self, component: str, module: str) -> QuantizedLayer | None:
        """Return the quantized layer ``module`` of ``component``, or None."""
        for layer in self.layers:
            if layer.component == component and layer.module == module:
                return layer
        return None
