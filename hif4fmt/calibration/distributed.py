"""Scale-out: shard calibration prompts over processes and merge their statistics with collectives.

Why this module exists: calibrating a 2 x 14B model on 16 long videos is slow on one device; prompts
are independent, so ``torchrun --nproc-per-node N -m hif4fmt calibrate ...`` runs one process per
device, each on its share of the prompts (spec 2.4), and the statistics are merged exactly (spec 3.3):
histogram counts, non-finite counts, tokens and calls by all_reduce SUM, exact max by MAX, exact min
by MIN (all exact, order-independent), and the held-out rows by all_gather of each process's
bottom-R rows followed by a bottom-R selection on the unique splitmix64 keys. The merged statistics
equal those of one process running every prompt (tests/test_calibration_distributed.py checks the
files are byte-identical). Backend: ``nccl`` when calibrating on CUDA, ``gloo`` on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hif4fmt.calibration.hooks import ActivationCollector
from hif4fmt.calibration.sketch import INT32_COUNT_LIMIT
from hif4fmt.errors import CalibrationError

HOLDOUT_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # -1: no rows on this rank
NO_ROWS = -1


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the calibration job: rank, world size, backend (None when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes the statistics file (rank 0)."""
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """Return where tensors must be for collectives: the local CUDA device for nccl, else CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_from_environment(device_type: str) -> ProcessGroup:
    """Return the process group set up by ``torchrun`` (WORLD_SIZE > 1), or a single-process group.

    Initialises ``torch.distributed`` with ``nccl`` for CUDA and ``gloo`` otherwise (env:// rendezvous).
    """
    import torch.distributed as dist

    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise CalibrationError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers (set by torchrun): {exc}") from None
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_available():
        raise CalibrationError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = "nccl" if device_type == "cuda" else "gloo"
    initialized_here = False
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        initialized_here = True
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), initialized_here)


def shard_records(count: int, group: ProcessGroup) -> list[int]:
    """Return the global record indices this process calibrates on: rank, rank + world, ... (round robin)."""
    return list(range(group.rank, count, group.world_size))


def _all_reduce(tensor: torch.Tensor, op: str, group: ProcessGroup) -> torch.Tensor:
    """Return ``tensor`` reduced over all processes with ``op`` ("sum", "max", "min"), on its own device."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    work = tensor.to(group.collective_device).contiguous()
    dist.all_reduce(work, op=ops[op])
    return work.to(tensor.device)


def _all_gather(tensor: torch.Tensor, group: ProcessGroup) -> list[torch.Tensor]:
    """Return ``tensor`` (same shape on every rank) from every rank, in rank order, on the CPU."""
    import torch.distributed as dist

    work = tensor.to(group.collective_device).contiguous()
    gathered = [torch.empty_like(work) for _ in range(group.world_size)]
    dist.all_gather(gathered, work)
    return [item.cpu() for item in gathered]


def merge_across_processes(collector: ActivationCollector, group: ProcessGroup) -> None:
    """Replace every layer's statistics by the merge over all processes (in place, on every rank)."""
    if group.world_size <= 1:
        return
    for observation in collector.layers():
        sketch, sample = observation.sketch, observation.holdout
        totals = _all_reduce(torch.tensor([sketch.tokens, observation.calls], dtype=torch.int64), "sum", group)
        merged_tokens = int(totals[0])
        if sketch.counts.dtype == torch.int32 and merged_tokens > INT32_COUNT_LIMIT:
            sketch.counts = sketch.counts.to(torch.int64)  # a merged bin could pass int32: never wrap (spec 3.4)
        sketch.counts = _all_reduce(sketch.counts, "sum", group)
        sketch.nonfinite = _all_reduce(sketch.nonfinite, "sum", group)
        sketch.absmax = _all_reduce(sketch.absmax, "max", group)
        sketch.absmin = _all_reduce(sketch.absmin, "min", group)
        sketch.tokens, observation.calls = merged_tokens, int(totals[1])
        _merge_holdout(observation.module, sample, group)


def _merge_holdout(module: str, sample, group: ProcessGroup) -> None:
    """Gather every rank's held-out rows (padded to capacity) and keep the bottom-R keys of the union."""
    capacity, channels = sample.capacity, sample.channels
    if capacity == 0:
        return
    count = 0 if sample.rows is None else int(sample.rows.shape[0])
    code = NO_ROWS if sample.rows is None else HOLDOUT_DTYPE_CODES.get(sample.rows.dtype)
    if code is None:
        raise CalibrationError(f"{module}: held-out rows of dtype {sample.rows.dtype} cannot be merged; "
                               f"run the pipeline in bfloat16, float16 or float32")
    meta = _all_gather(torch.tensor([count, code], dtype=torch.int64), group)
    codes = {int(m[1]) for m in meta if int(m[1]) != NO_ROWS}
    if len(codes) > 1:
        raise CalibrationError(f"{module}: processes saw activations in different dtypes; run every process "
                               f"with the same --dtype")
    rows = torch.zeros((capacity, channels), dtype=torch.float32)  # bf16/f16 -> f32 is exact
    ids = torch.zeros(capacity, dtype=torch.int64)
    if count:
        rows[:count] = sample.rows.to(torch.float32)
        ids[:count] = sample.ids
    all_rows, all_ids = _all_gather(rows, group), _all_gather(ids, group)
    if not codes:
        return
    dtype = {value: key for key, value in HOLDOUT_DTYPE_CODES.items()}[codes.pop()]
    sample.rows, sample.ids, sample.keys = None, sample.ids[:0], sample.keys[:0]
    for rank, (rank_rows, rank_ids) in enumerate(zip(all_rows, all_ids)):
        n = int(meta[rank][0])
        sample.merge_(rank_rows[:n].to(dtype), rank_ids[:n])


def finish(group: ProcessGroup) -> None:
    """Wait for every process, then tear the process group down if this module set it up."""
    if group.world_size <= 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if group.initialized_here:
        dist.destroy_process_group()
