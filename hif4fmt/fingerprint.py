"""The base-checkpoint fingerprint: one SHA-256 over the transformer tensors, independent of file layout.

Why this module exists: a .hif4 state holds masks only, so it is useful only with the exact base weights
it was calibrated on. The fingerprint identifies those weights by content (tensor name, dtype, shape and
raw bytes), so re-sharding, re-ordering tensors inside a file or editing safetensors metadata keeps it,
while one flipped weight bit changes it. Per-tensor digests are kept so ``verify`` can name the layers
that differ. Byte-level definition: spec/state-v1.md section 6 (algorithm ``hif4fmt-sha256-tensors-v1``).

Speed: hashlib releases the GIL while hashing, so tensors are hashed on several threads at once, each
streaming 16 MiB slices of the file's mmap, in batches of consecutive tensors (one task per batch, so a
header of many tiny tensors costs little); on 2 cores this is at parity with ``openssl dgst -sha256``
on the same files (``benchmarks/verify_speed.py``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hif4fmt.base import BaseCheckpoint, ComponentCheckpoint
from hif4fmt.constants import (
    FINGERPRINT_ALGORITHM,
    HASH_BATCH_BYTES,
    HASH_BATCH_TENSORS,
    HASH_CHUNK_BYTES,
    HASH_MAX_THREADS,
    U64,
)


@dataclass(frozen=True)
class ComponentFingerprint:
    """One component's digest (hex), its raw tensor bytes, and every tensor's digest by name (hex)."""

    digest: str
    total_bytes: int
    tensors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseFingerprint:
    """The combined fingerprint (hex) of a base checkpoint and its per-component fingerprints."""

    algorithm: str
    fingerprint: str
    components: dict[str, ComponentFingerprint]

    @property
    def total_bytes(self) -> int:
        """Return the raw tensor bytes hashed, all components together."""
        return sum(c.total_bytes for c in self.components.values())

    def to_dict(self, include_tensors: bool = False) -> dict[str, Any]:
        """Return the JSON form used by ``hif4fmt fingerprint --json`` (spec 9.4)."""
        components = {}
        for name, component in sorted(self.components.items()):
            entry: dict[str, Any] = {"digest": component.digest, "total_bytes": component.total_bytes,
                                     "tensor_count": len(component.tensors)}
            if include_tensors:
                entry["tensors"] = dict(sorted(component.tensors.items()))
            components[name] = entry
        return {"algorithm": self.algorithm, "fingerprint": self.fingerprint,
                "total_bytes": self.total_bytes, "components": components}


def _tensor_prefix(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> bytes:
    """Return the bytes hashed before a tensor's data (spec 6.2): lengths and values of name, dtype, shape."""
    name_bytes = name.encode("utf-8")
    dtype_bytes = dtype.encode("ascii")
    dims = tuple(shape)
    return b"".join([
        U64.pack(len(name_bytes)), name_bytes,
        U64.pack(len(dtype_bytes)), dtype_bytes,
        U64.pack(len(dims)), *(U64.pack(d) for d in dims),
        U64.pack(nbytes),
    ])


def tensor_digest(name: str, dtype: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    """Return the hex SHA-256 of one tensor (spec 6.2) from its raw little-endian bytes ``data``."""
    view = memoryview(data).cast("B")
    hasher = hashlib.sha256(_tensor_prefix(name, dtype, shape, view.nbytes))
    for start in range(0, view.nbytes, HASH_CHUNK_BYTES):
        hasher.update(view[start:start + HASH_CHUNK_BYTES])
    return hasher.hexdigest()


def component_tensor_digest(component: ComponentCheckpoint, name: str) -> str:
    """Return the hex digest of tensor ``name`` of ``component``, streamed from its mmap."""
    dtype, shape, _ = component.tensor_info(name)
    return tensor_digest(name, dtype, shape, component.read_tensor_bytes(name))


def component_digest(tensor_digests: dict[str, str]) -> str:
    """Return the hex component digest (spec 6.3): SHA-256 of the count then the raw digests by name."""
    hasher = hashlib.sha256(U64.pack(len(tensor_digests)))
    for name in sorted(tensor_digests):
        hasher.update(bytes.fromhex(tensor_digests[name]))
    return hasher.hexdigest()


def combine_fingerprint(component_digests: dict[str, str], algorithm: str = FINGERPRINT_ALGORITHM) -> str:
    """Return the hex base fingerprint (spec 6.4) of {component name: hex component digest}."""
    algorithm_bytes = algorithm.encode("ascii")
    hasher = hashlib.sha256(U64.pack(len(algorithm_bytes)) + algorithm_bytes + U64.pack(len(component_digests)))
    for name in sorted(component_digests):
        name_bytes = name.encode("utf-8")
        hasher.update(U64.pack(len(name_bytes)) + name_bytes + bytes.fromhex(component_digests[name]))
    return hasher.hexdigest()


def default_threads() -> int:
    """Return how many tensors to hash at once: the CPU count, at most ``HASH_MAX_THREADS``."""
    return max(1, min(HASH_MAX_THREADS, os.cpu_count() or 1))


def hash_batches(jobs: list[tuple[ComponentCheckpoint, str]]) -> list[list[tuple[ComponentCheckpoint, str]]]:
    """Return ``jobs`` cut, in order, into batches of at most ``HASH_BATCH_TENSORS`` tensors and (unless one
    tensor is larger) ``HASH_BATCH_BYTES`` bytes: one thread-pool task per batch, not per tensor."""
    batches: list[list[tuple[ComponentCheckpoint, str]]] = []
    current: list[tuple[ComponentCheckpoint, str]] = []
    size = 0
    for component, name in jobs:
        nbytes = component.entry(name).nbytes
        if current and (len(current) >= HASH_BATCH_TENSORS or size + nbytes > HASH_BATCH_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append((component, name))
        size += nbytes
    if current:
        batches.append(current)
    return batches


def _hash_batch(batch: list[tuple[ComponentCheckpoint, str]]) -> list[str]:
    return [component_tensor_digest(component, name) for component, name in batch]


def fingerprint_checkpoint(base: BaseCheckpoint, threads: int | None = None) -> BaseFingerprint:
    """Return the fingerprint of an opened checkpoint, hashing tensors on ``threads`` threads."""
    jobs = [(component, name) for component in base.components.values() for name in component.tensor_names()]
    # hash in file order (file, offset) so the disk reads mostly forward
    jobs.sort(key=lambda job: (str(job[0].entry(job[1]).file), job[0].entry(job[1]).begin))
    workers = threads or default_threads()
    if workers == 1:
        digests = _hash_batch(jobs)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hif4-hash") as pool:
            digests = [digest for batch in pool.map(_hash_batch, hash_batches(jobs)) for digest in batch]
    per_component: dict[str, dict[str, str]] = {name: {} for name in base.components}
    for (component, name), digest in zip(jobs, digests):
        per_component[component.name][name] = digest
    components = {
        name: ComponentFingerprint(component_digest(tensors), base.components[name].total_bytes,
                                   dict(sorted(tensors.items())))
        for name, tensors in sorted(per_component.items())
    }
    fingerprint = combine_fingerprint({name: c.digest for name, c in components.items()})
    return BaseFingerprint(FINGERPRINT_ALGORITHM, fingerprint, components)


def fingerprint_base(path: str | os.PathLike | BaseCheckpoint, threads: int | None = None) -> BaseFingerprint:
    """Return the fingerprint of the base checkpoint at ``path`` (a folder, or an opened checkpoint).

    Raises ``BaseCheckpointError`` for a folder that is not a readable diffusers/transformer checkpoint.
    """
    if isinstance(path, BaseCheckpoint):
        return fingerprint_checkpoint(path, threads)
    with BaseCheckpoint.open(Path(path)) as base:
        return fingerprint_checkpoint(base, threads)
