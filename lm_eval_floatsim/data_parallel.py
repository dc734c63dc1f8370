"""Data-parallel runs of `mamba_floatsim` (`accelerate launch` / `torchrun`), as functions FloatSimLM calls.

Requests are split across every launched process (on CPU too), each rank runs its distinct requests
alone, rank 0 calibrates first, and the statistics are combined over the ranks before the summary.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch


def launched() -> bool:
    """Started by torchrun or accelerate launch with several processes (they set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_cpu_process_group() -> None:
    """Initialize accelerate's (process-wide) state for a multi-process CPU run, with gloo.

    accelerate sets up CPU processes only when told the run is on CPU (`cpu=True`), which HFLM's
    `Accelerator()` does not say: under torchrun on a machine without GPUs every process would
    believe it is alone. The Accelerator that HFLM creates next shares this state. The timeout is
    HFLM's: a long evaluation on one rank must not time the others out.
    """
    from accelerate import Accelerator, InitProcessGroupKwargs

    Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])


def use_all_processes(lm) -> None:
    """Split the requests over every launched process, on CPU too.

    HFLM takes rank and world size from accelerate only when there are several GPUs; with
    `torchrun --nproc_per_node 2` on CPU every process would evaluate everything and write.
    """
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1:
        lm._rank = accelerator.process_index
        lm._world_size = accelerator.num_processes


def main_process_first(lm):
    """A context in which rank 0 runs first (it calibrates and caches the scales; the others read them)."""
    accelerator = getattr(lm, "accelerator", None)
    return accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()


def is_main_process(lm) -> bool:
    accelerator = getattr(lm, "accelerator", None)
    return accelerator is None or accelerator.is_main_process


def run_alone(lm, method, requests, disable_tqdm: bool):
    """Run each distinct request once, on this rank alone.

    In data-parallel runs lm-eval pads every rank's request list with copies of its last
    request, and loglikelihood_rolling pads its windows across ranks, so that DDP/FSDP
    forwards stay in lockstep. The model here has no collective operation; those copies would
    only cost time and count positions twice in the statistics. They get the result of the
    request they copy; inside the method the rank sees itself as a single process.
    """
    distinct, positions = _without_copies(requests)
    world_size, lm._world_size = lm._world_size, 1
    try:
        results = method(distinct, disable_tqdm=disable_tqdm)
    finally:
        lm._world_size = world_size
    return [results[position] for position in positions]


def _without_copies(requests: list) -> tuple[list, list[int]]:
    """The requests without lm-eval's padding copies, and for each original position its result's index.

    lm-eval lists a request `repeats` times; data-parallel padding appends the same object again.
    """
    distinct: list = []
    positions: list[int] = []
    seen: dict[int, tuple[int, int]] = {}  # id -> (occurrences kept, index of the first)
    for request in requests:
        kept, first = seen.get(id(request), (0, len(distinct)))
        if kept < getattr(request, "repeats", 1):
            positions.append(len(distinct))
            distinct.append(request)
            seen[id(request)] = (kept + 1, first)
        else:
            positions.append(first)
    return distinct, positions


def combine_statistics(recorder) -> None:
    """Give every rank the statistics of all: SUM of the partial sums, MAX of the partial maxes."""
    torch.distributed.all_reduce(recorder.partial_sums, op=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(recorder.partial_maxes, op=torch.distributed.ReduceOp.MAX)
