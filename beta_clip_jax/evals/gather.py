"""Multi-host evaluation: each process computes a slice of the items, every process gets all rows.

Process p handles indices [p * L, (p + 1) * L) with L = ceil(N / P), and every batch is padded to
`batch_size` by repeating a valid index. So every process makes the same number of encoder calls
with the same shapes (jitted collective calls line up), whatever N is. The slices are joined with
`process_allgather` in process order and rows at index >= N (padding) are dropped: no duplicates,
no losses. With one process this is a plain batched map.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np


def shard_bounds(num_items: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(start, per_process_length) of this process's padded slice of range(num_items)."""
    per_process = -(-num_items // process_count) if num_items else 0
    return process_index * per_process, per_process


def allgather_rows(local: np.ndarray, num_items: int) -> np.ndarray:
    """Join equal-length per-process slices in process order and keep the first num_items rows."""
    if jax.process_count() == 1:
        return np.asarray(local)[:num_items]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=False))
    return gathered.reshape((-1,) + gathered.shape[2:])[:num_items]


def sharded_map(
    compute: Callable[[np.ndarray], np.ndarray],
    num_items: int,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> np.ndarray:
    """compute(indices [batch_size]) -> [batch_size, ...] over all items -> [num_items, ...].

    compute always receives exactly batch_size indices (padding repeats the last valid index, or
    index 0 for a process past the end), so shapes never change between calls or processes.
    """
    if num_items <= 0:
        raise ValueError("nothing to evaluate: the dataset is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pid = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    start, length = shard_bounds(num_items, pid, count)
    num_batches = -(-length // batch_size)
    outputs = []
    for b in range(num_batches):
        idx = start + b * batch_size + np.arange(batch_size)
        last_valid = min(num_items, start + length) - 1
        idx = np.minimum(idx, max(last_valid, 0))
        out = np.asarray(compute(idx))
        if out.shape[0] != batch_size:
            raise ValueError(f"compute returned {out.shape[0]} rows for {batch_size} indices")
        outputs.append(out)
    local = np.concatenate(outputs)[:length]
    return allgather_rows(local, num_items)
