"""Check that a .hif4 state belongs to a base checkpoint, and say precisely where they differ.

Why this module exists: a state's masks are only meaningful with the exact weights they were calibrated
on. ``verify_state`` validates the state file (checksums included), recomputes the base fingerprint and
compares it with the binding stored in the state. On a mismatch it names the component and the first
layers whose ``<module>.weight`` differs (changed weights, a missing tensor, a changed shape), using the
per-layer weight digests stored in the state, and recognises two components swapped with each other
(``transformer`` <-> ``transformer_2``). A state of format 1.1 also records every base tensor's dtype,
shape and digest and the base's layout, so a changed bias or norm, an added, removed or re-typed tensor
is named with what differs, and a base of another Wan layout is named with both layouts. Exit codes in the CLI: 0 match, 1 mismatch, 2 invalid input.
Torch-free. Spec: spec/state-v1.md section 7.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from hif4fmt.base import BaseCheckpoint
from hif4fmt.errors import BaseMismatchError
from hif4fmt.fingerprint import BaseFingerprint, fingerprint_checkpoint
from hif4fmt.layouts import describe_layout, layout_label
from hif4fmt.state import State, read_state

MAX_REPORTED_LAYERS = 5  # differing layers named per component
MAX_REPORTED_TENSORS = 5  # differing tensors named per component (state format 1.1, base.tensors)
DIGEST_SHOWN = 16  # hex digits of a digest shown in messages (names and shapes are always shown whole)
MISMATCH_FIX = ("to fix: restore the base this state was built for (same files as when it was built), or "
                "rebuild the state for this base (hif4fmt calibrate, then hif4fmt build), or, to run it "
                "anyway with undefined quality, pass --no-verify to wan-runtime generate")


@dataclass(frozen=True)
class LayerDifference:
    """One quantized layer whose base weight is not the one the state was built on."""

    module: str
    problem: str  # "weights differ" | "weight tensor missing" | "shape changed"
    expected: str  # the weight digest, the tensor name (missing) or the shape [out, in]
    found: str
    what: str = ""  # for "weights differ": what changed (the bytes, or the dtype), in words

    def describe(self) -> str:
        """Return one line: the tensor, the problem and what differs (digests shortened, names whole)."""
        weight = f"{self.module}.weight"
        if self.problem == "weight tensor missing":
            return f"{weight} is missing from the base"
        if self.problem == "shape changed":
            return f"{weight} has shape {self.found}, the state expects {self.expected}"
        return (f"{weight}: {self.what or 'bytes differ'} (digest expected {self.expected[:DIGEST_SHOWN]}, found "
                f"{self.found[:DIGEST_SHOWN]})")


@dataclass(frozen=True)
class TensorDifference:
    """One base tensor that is not as the state recorded it (format 1.1 ``base.tensors``).

    ``problem``: "missing" (recorded, absent from the base), "extra" (in the base, not recorded),
    "dtype changed", "shape changed" or "bytes differ".
    """

    tensor: str
    problem: str
    expected: str
    found: str

    def describe(self) -> str:
        """Return one line naming the whole tensor and what differs."""
        if self.problem == "missing":
            return f"{self.tensor} is missing from the base"
        if self.problem == "extra":
            return f"{self.tensor} is in the base but not in the base the state was built on"
        if self.problem == "bytes differ":
            return (f"{self.tensor}: bytes differ (digest expected {self.expected[:DIGEST_SHOWN]}, found "
                    f"{self.found[:DIGEST_SHOWN]})")
        return f"{self.tensor}: {self.problem} from {self.expected} to {self.found}"


@dataclass(frozen=True)
class ComponentCheck:
    """Outcome for one component: status is match, differs, swapped, missing (from base) or unbound."""

    name: str
    status: str
    expected_digest: str | None
    found_digest: str | None
    detail: str
    differing_layers: list[LayerDifference] = field(default_factory=list)
    differing_count: int = 0
    checked_layers: int = 0
    differing_tensors: list[TensorDifference] = field(default_factory=list)
    differing_tensor_count: int = 0


@dataclass(frozen=True)
class VerifyReport:
    """Result of ``verify_state``: ``ok`` is True when the base fingerprint matches the state's binding."""

    ok: bool
    message: str
    state: str
    base: str
    algorithm: str
    expected_fingerprint: str
    found_fingerprint: str
    components: dict[str, ComponentCheck]
    expected_layout: dict[str, Any] | None = None  # base.layout of the state (1.1), None if not recorded
    found_layout: dict[str, Any] | None = None  # hif4fmt.layouts.describe_layout of the base

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form printed by ``hif4fmt verify --json`` (spec 9.3)."""
        result = asdict(self)
        result["components"] = {name: asdict(check) for name, check in sorted(self.components.items())}
        return result

    def raise_for_mismatch(self) -> None:
        """Raise ``BaseMismatchError`` (exit code 1) with ``message`` unless ``ok``."""
        if not self.ok:
            raise BaseMismatchError(self.message)


def _layer_differences(state: State, component: str, base: BaseCheckpoint, found: BaseFingerprint
                       ) -> tuple[list[LayerDifference], int, int]:
    """Return (first differing layers, how many differ, how many were checked) for ``component``."""
    differences: list[LayerDifference] = []
    count = 0
    layers = state.layers_of(component)
    checkpoint = base.components[component]
    digests = found.components[component].tensors
    dtypes = [checkpoint.tensor_info(f"{l.module}.weight")[0] for l in layers if f"{l.module}.weight" in digests]
    usual_dtype = max(sorted(set(dtypes)), key=dtypes.count) if dtypes else None
    for layer in layers:
        weight = f"{layer.module}.weight"
        difference = None
        if weight not in digests:
            difference = LayerDifference(layer.module, "weight tensor missing", weight, "absent")
        else:
            _, shape, _ = checkpoint.tensor_info(weight)
            expected_shape = (layer.out_features, layer.in_features)
            if tuple(shape) != expected_shape:
                difference = LayerDifference(layer.module, "shape changed", str(list(expected_shape)), str(list(shape)))
            elif digests[weight] != layer.weight_fingerprint:
                dtype = checkpoint.tensor_info(weight)[0]
                what = (f"dtype {dtype}, the other quantized weights are {usual_dtype}" if dtype != usual_dtype
                        else f"bytes of {weight} ({dtype} {list(shape)})")
                difference = LayerDifference(layer.module, "weights differ", layer.weight_fingerprint, digests[weight],
                                             what)
        if difference is not None:
            count += 1
            if len(differences) < MAX_REPORTED_LAYERS:
                differences.append(difference)
    return differences, count, len(layers)


def _tensor_differences(state: State, component: str, base: BaseCheckpoint, found: BaseFingerprint
                        ) -> tuple[list[TensorDifference], int] | None:
    """Return (first differing tensors, how many) of ``component`` from ``base.tensors``; None if not recorded."""
    recorded = state.base.tensors.get(component)
    if recorded is None:
        return None
    checkpoint = base.components[component]
    digests = found.components[component].tensors
    differences: list[TensorDifference] = []
    for name in sorted(set(recorded) | set(digests)):
        want = recorded.get(name)
        if want is None:
            dtype, shape, _ = checkpoint.tensor_info(name)
            differences.append(TensorDifference(name, "extra", "absent", f"{dtype} {list(shape)}"))
        elif name not in digests:
            differences.append(TensorDifference(name, "missing", f"{want.dtype} {list(want.shape)}", "absent"))
        elif digests[name] != want.digest:
            dtype, shape, _ = checkpoint.tensor_info(name)
            if dtype != want.dtype:
                differences.append(TensorDifference(name, "dtype changed", want.dtype, dtype))
            elif tuple(shape) != tuple(want.shape):
                differences.append(TensorDifference(name, "shape changed", str(list(want.shape)), str(list(shape))))
            else:
                differences.append(TensorDifference(name, "bytes differ", want.digest, digests[name]))
    return differences[:MAX_REPORTED_TENSORS], len(differences)


def compare_with_base(state: State, base: BaseCheckpoint, found: BaseFingerprint, state_name: str = "state"
                      ) -> VerifyReport:
    """Return the report comparing ``state``'s binding with ``found`` (the fingerprint of ``base``)."""
    expected = state.base
    ok = expected.algorithm == found.algorithm and expected.fingerprint == found.fingerprint
    found_digests = {name: c.digest for name, c in found.components.items()}
    checks: dict[str, ComponentCheck] = {}
    for name in sorted(expected.components):
        want = expected.components[name]
        have = found_digests.get(name)
        if have is None:
            checks[name] = ComponentCheck(name, "missing", want, None,
                                          f"{name}: the base has no {name} component")
            continue
        if have == want:
            checks[name] = ComponentCheck(name, "match", want, have, f"{name}: matches",
                                          checked_layers=len(state.layers_of(name)))
            continue
        holder = next((other for other, digest in sorted(found_digests.items()) if digest == want and other != name),
                      None)
        if holder is not None:
            checks[name] = ComponentCheck(
                name, "swapped", want, have,
                f"{name}: the weights the state expects in {name} are in the base's {holder}; "
                f"{name} and {holder} are swapped (wrong folder names or model_index.json?)")
            continue
        differences, count, checked = _layer_differences(state, name, base, found)
        tensors = _tensor_differences(state, name, base, found)
        if tensors is not None and tensors[1]:
            named, total = tensors
            detail = (f"{name}: {total} tensor{'s' if total != 1 else ''} differ from the base the state was "
                      f"built on ({checked - count} of {checked} quantized layer weights match): "
                      + "; ".join(t.describe() for t in named) + (f"; and {total - len(named)} more" if total > len(named) else ""))
            checks[name] = ComponentCheck(name, "differs", want, have, detail, differences, count, checked,
                                          named, total)
            continue
        if differences:
            first = differences[0]
            detail = (f"{name}: {count} of {checked} quantized layers differ, first {first.module} "
                      f"({first.problem}: {first.describe()})")
        else:
            size = ""
            if expected.total_bytes != found.total_bytes:
                size = (f"; the base holds {found.total_bytes} bytes of tensors where the state's base held "
                        f"{expected.total_bytes}, so tensors were added, removed or changed dtype")
            detail = (f"{name}: all {checked} quantized layer weights match, but other tensors differ "
                      f"(a bias, norm, embedding or kept layer changed, or tensors were added/removed; the state "
                      f"records digests only for the quantized weights, so `hif4fmt fingerprint --tensors` of "
                      f"both bases names them){size}")
        checks[name] = ComponentCheck(name, "differs", want, have, detail, differences, count, checked)
    for name in sorted(set(found_digests) - set(expected.components)):
        checks[name] = ComponentCheck(name, "unbound", None, found_digests[name],
                                      f"{name}: present in the base but not bound by the state")
    found_layout = describe_layout(base.path) if base.path.is_dir() else None
    other_layout = (expected.layout is not None and found_layout is not None
                    and (expected.layout["name"], expected.layout["pipeline"], expected.layout["transformers"])
                    != (found_layout["name"], found_layout["pipeline"], found_layout["transformers"]))
    if ok:
        message = f"{state_name} matches base {found.fingerprint[:DIGEST_SHOWN]} ({len(found_digests)} components)"
    else:
        problems = [check.detail for check in checks.values() if check.status != "match"]
        if expected.algorithm != found.algorithm:
            problems.insert(0, f"fingerprint algorithm {expected.algorithm} vs {found.algorithm}")
        if not problems and expected.algorithm == found.algorithm:
            problems = ["every component digest matches, but the state's base.fingerprint is not the spec 6.4 "
                        "fingerprint of those digests (the state was written with a wrong fingerprint; rebuild it)"]
        if other_layout:
            problems.insert(0, f"the state was built for layout {layout_label(expected.layout)}, this base has "
                               f"layout {layout_label(found_layout)}")
        message = (f"{state_name} was built for base {expected.fingerprint[:DIGEST_SHOWN]}, this base is "
                   f"{found.fingerprint[:DIGEST_SHOWN]}: " + "; ".join(problems or ["fingerprints differ"])
                   + f"; {MISMATCH_FIX}")
    return VerifyReport(ok, message, state_name, str(base.path), expected.algorithm, expected.fingerprint,
                        found.fingerprint, checks, expected.layout, found_layout)


def verify_state(state_path: str | os.PathLike, base_path: str | os.PathLike, threads: int | None = None
                 ) -> VerifyReport:
    """Return a ``VerifyReport`` of the state at ``state_path`` against the base at ``base_path``.

    The state is read fully (every checksum checked) and the base is hashed completely. Invalid input
    raises ``StateFormatError`` / ``BaseCheckpointError`` (exit 2); a mismatch is a report with
    ``ok == False`` (call ``raise_for_mismatch`` to turn it into ``BaseMismatchError``, exit 1).
    """
    state = read_state(state_path)
    with BaseCheckpoint.open(base_path) as base:
        found = fingerprint_checkpoint(base, threads)
        return compare_with_base(state, base, found, str(state_path))
