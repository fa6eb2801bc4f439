"""Data shards: a stage's rows dealt to a fixed number of shards, each packed by a pipeline
of its own, and each process reading only the shards it owns.

The global batch is the shards' batches in shard order, so it does not depend on how many
processes read it: a 1-process run with `shards = 2` trains on exactly the batches of a
2-process run, and a run can resume on another process count that divides the shards. The
iterator state is one JSON state per shard; a checkpoint holds every shard's (`gather`).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import numpy as np

from r1jax.core import multihost


def owned(shards: int) -> tuple[range, int]:
  """(the shards this process reads, the shard count); `shards` 0 means one per process."""
  count, index = jax.process_count(), jax.process_index()
  total = shards or count
  if total % count:
    raise ValueError(f"data.shards={total} do not split over {count} processes: use a "
                     f"multiple of {count}")
  per = total // count
  return range(index * per, (index + 1) * per), total


class ShardedIterator:
  """Batches of this process's shards, concatenated along the rows (shard order).

  `make(index, count)` builds shard `index` of `count`'s pipeline (an iterable whose iterator
  has get_state / set_state, `counts` and `should_stop`, as data/pipeline.py's SFT one)."""

  def __init__(self, make: Callable[[int, int], Any], shards: int = 0):
    self.mine, self.total = owned(shards)
    self._its = [iter(make(i, self.total)) for i in self.mine]

  def __iter__(self) -> ShardedIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  @property
  def should_stop(self) -> Callable[[], bool] | None:
    return self._its[0].should_stop

  @should_stop.setter
  def should_stop(self, fn: Callable[[], bool] | None) -> None:
    for it in self._its:
      it.should_stop = fn

  @property
  def counts(self) -> collections.Counter:
    """This process's data counts (rows read, documents, bad rows…), its shards summed."""
    out: collections.Counter = collections.Counter()
    for it in self._its:
      out.update(it.counts)
    return out

  def get_state(self) -> dict[str, Any]:
    """{shard index: its state} for this process's shards (JSON)."""
    return {str(i): it.get_state() for i, it in zip(self.mine, self._its)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores this process's shards from a state holding them (`gather`'s, any process
    count); a state saved before shards existed is shard 0 of 1."""
    if not all(k.isdigit() for k in state):
      state = {"0": state}
    missing = [i for i in self.mine if str(i) not in state]
    if missing or len(state) != self.total:
      raise ValueError(f"the checkpoint's data state has shards {sorted(state, key=int)}, this "
                       f"run reads {self.total} (this process: {list(self.mine)}): resume with "
                       f"the data.shards it was saved with")
    for i, it in zip(self.mine, self._its):
      it.set_state(state[str(i)])


def gather(state: dict[str, Any]) -> dict[str, Any]:
  """Every process's shard states merged, on every process: what a checkpoint saves."""
  out: dict[str, Any] = {}
  for part in multihost.gather_json(state):
    out.update(part)
  return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
