"""Multi-process runs, one JAX process per host (`jax.distributed`): start-up with bounded
failure detection, barriers with a timeout, one-time work done by process 0 with its outcome
shared, host-local rows made global arrays, and host metrics reduced over processes.

Every call also works in a single-process run, where it is a plain local step, so stages
call them unconditionally. What a lost process does to the others: the coordination service
stops hearing its heartbeat, and after `heartbeat_timeout_s` every other process ends
(non-zero, naming the lost task) instead of waiting in a collective forever.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from typing import Any, Callable

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the client: see _client
from jax.experimental import multihost_utils

from r1jax.core import errors

log = logging.getLogger(__name__)

_KEY_PREFIX = "r1jax"
_counter = itertools.count()  # every process makes the same calls in the same order


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
  """Not every process reached a barrier in time."""


def barrier(name: str, timeout_s: float = 600.0) -> None:
  """Every process waits here until all arrive; BarrierTimeout after `timeout_s`."""
  if jax.process_count() == 1:
    return
  key = f"{_KEY_PREFIX}/barrier/{name}/{next(_counter)}"
  try:
    _client().wait_at_barrier(key, int(timeout_s * 1000))
  except Exception as e:  # the client raises its runtime's error type
    raise BarrierTimeout(f"barrier {name!r}: not every process arrived within {timeout_s:g} s "
                         f"({str(e).splitlines()[0]})") from e


def run_once(name: str, fn: Callable[[], Any], timeout_s: float = 3600.0) -> Any:
  """fn() on process 0 only (data preparation, a tokenizer, directories), then its result on
  every process. If it raises, every process raises: process 0 its own error, the others
  ProcessFailed with its exit status and message, so no process goes on while one has
  failed. The result must be JSON-serialisable (paths, counts) or None."""
  if jax.process_count() == 1:
    return fn()
  client, key = _client(), f"{_KEY_PREFIX}/once/{name}/{next(_counter)}"
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
  client, key = _client(), f"{_KEY_PREFIX}/gather/{next(_counter)}"
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


def sum_over_processes(counts: dict[str, float]) -> dict[str, float]:
  """Host counts (rows read, bad rows of each reason, documents) summed over processes; a
  key one process lacks counts 0 there."""
  out: dict[str, float] = {}
  for part in gather_json({k: float(v) for k, v in counts.items()}):
    for k, v in part.items():
      out[k] = out.get(k, 0.0) + v
  return out
