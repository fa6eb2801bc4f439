"""Multi-process runs, one JAX process per host (`jax.distributed`): start-up with bounded
failure detection, barriers with a timeout, one-time work done by process 0 with its outcome
shared, host-local rows made global arrays, and host metrics reduced over processes.

Every call also works in a single-process run, where it is a plain local step, so stages
call them unconditionally. What a lost process does to the others: the coordination service
stops hearing its heartbeat, and after `heartbeat_timeout_s` every other process ends
(non-zero, naming the lost task) instead of waiting in a collective forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import re
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the client: see _client
from jax.experimental import multihost_utils

from r1jax.core import errors

log = logging.getLogger(__name__)

_KEY_PREFIX = "r1jax"
# Keys of the coordination service's store: every process makes the same calls in the same
# order within a thread's namespace (`namespace`: a background thread has its own sequence).
_counters: dict[str, Iterator[int]] = {}
_thread = threading.local()


@contextlib.contextmanager
def namespace(name: str):
  """This thread's agreement calls (gather, barrier, run_once) numbered apart from other
  threads': a background rollout's calls interleave with the main thread's in any order,
  and each thread's sequence is the same on every process."""
  before = getattr(_thread, "namespace", "main")
  _thread.namespace = name
  try:
    yield
  finally:
    _thread.namespace = before


def _key(kind: str) -> str:
  ns = getattr(_thread, "namespace", "main")
  return f"{_KEY_PREFIX}/{ns}/{kind}/{next(_counters.setdefault(ns, itertools.count()))}"


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the others. An empty `coordinator` lets JAX detect the cluster
  (Cloud TPU VMs, Slurm, Open MPI); set it, `num_processes` and `process_id` elsewhere (two
  processes on one machine, a GPU cluster without a scheduler JAX knows)."""

  coordinator: str = ""  # host:port of process 0's coordination service
  num_processes: int = 0
  process_id: int = -1
  heartbeat_timeout_s: int = 100  # a process silent this long is lost: the others end
  shutdown_timeout_s: int = 300  # how long the last barrier at exit waits for stragglers
  init_timeout_s: int = 300  # how long start-up waits for every process to join

  def __post_init__(self):
    if self.coordinator and not (self.num_processes >= 1
                                 and 0 <= self.process_id < self.num_processes):
      raise ValueError(f"a coordinator address needs num_processes >= 1 and 0 <= process_id < "
                       f"num_processes, got {self.num_processes}, {self.process_id}")
    for name in ("heartbeat_timeout_s", "shutdown_timeout_s", "init_timeout_s"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1 second, got {getattr(self, name)}")


def initialize(cluster: Cluster) -> None:
  """jax.distributed.initialize with the cluster's timeouts (before any JAX computation)."""
  kwargs: dict[str, Any] = dict(initialization_timeout=cluster.init_timeout_s,
                                heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
                                shutdown_timeout_seconds=cluster.shutdown_timeout_s)
  if cluster.coordinator:
    kwargs.update(coordinator_address=cluster.coordinator,
                  num_processes=cluster.num_processes, process_id=cluster.process_id)
  jax.distributed.initialize(**kwargs)


def _client():
  """The coordination service's client (JAX keeps it in a private module: no public handle
  offers barriers with a timeout or the key-value store)."""
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("several JAX processes but no distributed client: call "
                       "multihost.initialize first")
  return client


class ProcessFailed(errors.RunError, RuntimeError):
  """Another process failed at a step this one waits for: the same exit status as its own."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


class BarrierTimeout(errors.RunError, RuntimeError):
  """Not every process reached a barrier in time; `lost`: the processes the coordination
  service declared dead meanwhile (their heartbeat lapsed), if it said so."""

  def __init__(self, message: str, lost: tuple[int, ...] = ()):
    super().__init__(message)
    self.lost = lost


def barrier(name: str, timeout_s: float = 600.0) -> None:
  """Every process waits here until all arrive; BarrierTimeout after `timeout_s`."""
  if jax.process_count() == 1:
    return
  key = _key(f"barrier/{name}")
  try:
    _client().wait_at_barrier(key, int(timeout_s * 1000))
  except Exception as e:  # the client raises its runtime's error type
    lost = tuple(sorted({int(t) for t in re.findall(r"Task (\d+) heartbeat timeout", str(e))}))
    raise BarrierTimeout(f"barrier {name!r}: not every process arrived within {timeout_s:g} s "
                         f"({str(e).splitlines()[0]})", lost) from e


def run_once(name: str, fn: Callable[[], Any], timeout_s: float = 3600.0) -> Any:
  """fn() on process 0 only (data preparation, a tokenizer, directories), then its result on
  every process. If it raises, every process raises: process 0 its own error, the others
  ProcessFailed with its exit status and message, so no process goes on while one has
  failed. The result must be JSON-serialisable (paths, counts) or None."""
  if jax.process_count() == 1:
    return fn()
  client, key = _client(), _key(f"once/{name}")
  if jax.process_index() == 0:
    try:
      value = fn()
    except BaseException as e:
      client.key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {e}",
                                            "exit_code": errors.exit_code(e)}))
      raise
    client.key_value_set(key, json.dumps({"value": value}))
    return value
  try:
    status = json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
  except Exception as e:
    raise BarrierTimeout(f"{name!r}: process 0 did not finish it within {timeout_s:g} s "
                         f"({str(e).splitlines()[0]})") from e
  if "error" in status:
    raise ProcessFailed(f"{name!r} failed on process 0: {status['error']}",
                        status["exit_code"])
  return status["value"]


def gather_json(value: Any, timeout_s: float = 600.0) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order, on every process (through
  the coordination service's key-value store: no device collective)."""
  if jax.process_count() == 1:
    return [value]
  client, key = _client(), _key("gather")
  client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
  try:
    return [json.loads(client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)))
            for i in range(jax.process_count())]
  except Exception as e:
    raise BarrierTimeout(f"gather: not every process sent its part within {timeout_s:g} s "
                         f"({str(e).splitlines()[0]})") from e


def any_process(flag: bool) -> bool:
  """True on every process if it is True on any (an end of data, a stop request), so all
  take the same branch before the next collective."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def local_rows(global_rows: int) -> slice:
  """The rows of a global batch this process feeds: an equal, contiguous block per process
  (the devices of a process hold contiguous rows of the batch axes; sharding.make_mesh)."""
  count, index = jax.process_count(), jax.process_index()
  if global_rows % count:
    raise ValueError(f"{global_rows} rows do not split over {count} processes; use a batch "
                     f"that is a multiple of {count}")
  per = global_rows // count
  return slice(index * per, (index + 1) * per)


def to_global(host: Any, shardings: Any) -> Any:
  """A pytree of this process's rows (numpy, the leading axis its block of the global
  rows) → global jax.Arrays with `shardings`. One process: a plain device_put of the rows,
  which are then all of them."""
  if jax.process_count() == 1:
    return jax.device_put(host, shardings)

  def one(x, sharding):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    _check_rows(sharding, shape)
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(one, host, shardings)


def _check_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> None:
  """This process's devices must hold its `local_rows` block, no more (rows replicated over
  processes would need every process's rows) and no other (they would silently land on other
  rows of the global batch)."""
  want = local_rows(shape[0])
  held = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    held.update(range(*index[0].indices(shape[0])) if index else range(shape[0]))
  if held != set(range(want.start, want.stop)):
    raise ValueError(f"process {jax.process_index()}'s devices hold rows {sorted(held)[:8]}… "
                     f"of {shape[0]}, not its block [{want.start}, {want.stop}): the rows must "
                     "split over the mesh's batch axes, whose devices go process by process")


def host_share(chunk: list, per: int) -> tuple[list, int]:
  """(this process's `per / processes` entries of a global batch, how many are real): the
  batch padded to `per` with its first entry (one shape for every batch), each process
  taking its block of positions. The global batch is then the one a single process feeds."""
  count, index = jax.process_count(), jax.process_index()
  if per % count:
    raise ValueError(f"a batch of {per} does not split over {count} processes; use a "
                     f"multiple of {count}")
  q = per // count
  padded = (list(chunk) + [chunk[0]] * (per - len(chunk)))[index * q:(index + 1) * q]
  return padded, min(max(len(chunk) - index * q, 0), q)


def host_indices(n: int, per: int) -> list[int]:
  """The indices of n entries, fed in batches of `per`, that are this process's real ones
  (`host_share` of each batch), in order."""
  q = per // jax.process_count()
  return [i for lo in range(0, n, per)
          for i in range(lo + jax.process_index() * q, min(lo + (jax.process_index() + 1) * q, n))]


def host_rows(tree: Any) -> Any:
  """A pytree of global arrays → numpy on this host: each row-sharded array's rows on this
  process's devices (its `local_rows` block, in order), a replicated one whole. A plain
  device_get of an array other processes hold parts of would fail (tunix#698)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    want, parts = local_rows(x.shape[0]), {}
    for shard in x.addressable_shards:
      parts.setdefault(shard.index[0].indices(x.shape[0])[0], shard)
    starts = sorted(parts)
    got = [r for i in starts for r in range(*parts[i].index[0].indices(x.shape[0]))]
    if got != list(range(want.start, want.stop)) or any(
        idx != slice(None) for idx in parts[starts[0]].index[1:]):
      raise ValueError(f"process {jax.process_index()} holds rows {got[:4]}… of a "
                       f"{x.shape} array, not its whole-row block [{want.start}, {want.stop})")
    return np.concatenate([np.asarray(parts[i].data) for i in starts])

  return jax.tree.map(one, tree)


def same_shape_everywhere(what: str, values: tuple[int, ...]) -> None:
  """Every process must run a collective on the same shapes, or all would wait in it
  forever: `values` (this process's rows, lengths) checked equal over processes, a
  ValueError naming them on every process if not."""
  if jax.process_count() == 1:
    return
  every = [tuple(v) for v in gather_json(list(values))]
  if len(set(every)) > 1:
    raise ValueError(f"{what} differ across processes: {every} (process order); every "
                     "process must feed the same number of rows of the same width")


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (a prompt bucket every process pads to)."""
  return value if jax.process_count() == 1 else max(gather_json(int(value)))


# How a host metric combines over processes: counts and rates add, extremes and seconds take
# the worst, the rest average (each process has as many rows, so a mean of means is the
# global mean; a reward that applies to some tasks only is averaged per process first).
SUMMED = ("reward/masked_samples", "dynamic/informative_groups", "tokens_per_s", "pack/rows",
          "pack/shared_prompt_tokens")
SUMMED_ENDINGS = ("_failures", "/samples")
SECONDS = ("reward/seconds", "reward/pool_cpu_s", "reward/device_s")


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
  """One step's host metrics over every process (the same dict on each): counts summed
  (`SUMMED`, `SUMMED_ENDINGS`), `*/max`, `time/*` and `SECONDS` the largest, `*/min` the
  smallest, others the mean."""
  if jax.process_count() == 1:
    return dict(metrics)
  every = gather_json({k: float(v) for k, v in metrics.items()})
  out = {}
  for k in every[0]:
    values = [part[k] for part in every if k in part]
    if k in SUMMED or k.endswith(SUMMED_ENDINGS):
      out[k] = float(sum(values))
    elif k.endswith("/max") or k.startswith("time/") or k in SECONDS:
      out[k] = max(values)
    elif k.endswith("/min"):
      out[k] = min(values)
    else:
      out[k] = float(np.mean(values))
  return out


def sum_over_processes(counts: dict[str, float]) -> dict[str, float]:
  """Host counts (rows read, bad rows of each reason, documents) summed over processes; a
  key one process lacks counts 0 there."""
  out: dict[str, float] = {}
  for part in gather_json({k: float(v) for k, v in counts.items()}):
    for k, v in part.items():
      out[k] = out.get(k, 0.0) + v
  return out
