"""Host process pool for rewards: hard per-task timeouts, crash replacement, fallback values.

Why not concurrent.futures.ProcessPoolExecutor: it cannot kill one hung task (a sympy power
tower, a regex blow-up) without breaking the whole pool. Here each worker has its own pipe and
one task at a time; a dispatcher thread in the trainer sends tasks to idle workers, and kills and
replaces a worker whose task overruns its deadline or that dies. The task's future then resolves
to the configured fallback with the failure recorded, so the trainer never crashes or stalls.

Workers are forked from a forkserver (never from the trainer, whose JAX threads make fork
unsafe) with math-verify preloaded, so a replacement costs milliseconds. Tasks run in the
worker's main thread, where math-verify's own signal timeouts also work.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import ctypes
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # registers its exit handler now, so that ours runs before it
import os
import pickle
import resource
import signal
import socket
import threading
import time
import weakref
from typing import Any, Callable

_log = logging.getLogger(__name__)
_READY = "ready"
_BROKEN = "pool broken: "
# This many workers in a row dying before they are ready means they can never start.
_MAX_STARTUP_FAILURES = 3
# Modules imported once in the forkserver so that every (re)started worker has them ready.
PRELOAD = ("math_verify", "r1jax.rewards.compose")


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What one task produced: its value (the fallback on failure) and why it failed, if it did."""

  value: Any
  error: str | None  # None on success; "timeout after …", "worker died …", "ValueError: …"
  seconds: float  # wall time from dispatch to resolution
  cpu_s: float = 0.0  # the worker's CPU time for the task (0 if it never reported back)

  @property
  def ok(self) -> bool:
    return self.error is None

  def value_or_raise(self) -> Any:
    """The value (the fallback for a failed task); raises RewardPoolBroken if no worker ran
    (a setup bug, not this sample's failure)."""
    if self.error is not None and self.error.startswith(_BROKEN):
      raise RewardPoolBroken("RewardPool is broken: " + self.error[len(_BROKEN):])
    return self.value


class RewardPoolBroken(RuntimeError):
  """Reward workers cannot run at all (for example the main module is not import-safe)."""


@dataclasses.dataclass
class _Task:
  payload: bytes
  future: concurrent.futures.Future
  timeout_s: float
  fallback: Any
  name: str
  started: float = 0.0


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.process.BaseProcess
  conn: multiprocessing.connection.Connection
  task_id: int | None = None
  ready: bool = False  # it said hello: a later death is the task's fault, not start-up's


def _set_parent_death_signal() -> None:
  """Asks the kernel to SIGKILL this worker when its parent (the forkserver) exits."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _worker_main(conn: multiprocessing.connection.Connection, memory_mb: int | None) -> None:
  """Worker loop: receive one pickled task, run it, send back (id, error, value)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle.
  _set_parent_death_signal()
  if memory_mb:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, hard))  # MemoryError, not OOM.
  conn.send(_READY)
  while True:
    try:
      data = conn.recv_bytes()
    except (EOFError, OSError):
      return  # The trainer went away.
    task_id = int.from_bytes(data[:8], "little")
    cpu = time.process_time()
    try:
      fn, args, kwargs = pickle.loads(data[8:])  # Inside the try: its module may fail to import.
      value, error = fn(*args, **kwargs), None
    except BaseException as e:  # pylint: disable=broad-except  (SystemExit from user code too)
      value, error = None, f"{type(e).__name__}: {str(e)[:300]}"
    cpu = time.process_time() - cpu
    try:
      conn.send((task_id, error, value, cpu))
    except (EOFError, OSError):
      return
    except Exception as e:  # pylint: disable=broad-except  (an unpicklable return value)
      conn.send((task_id, f"unpicklable result: {str(e)[:300]}", None, cpu))


class RewardPool:
  """Runs picklable functions in worker processes with hard timeouts; failures become fallbacks."""

  def __init__(self, num_workers: int | None = None, timeout_s: float = 10.0,
               fallback: Any = 0.0, memory_mb: int | None = 4096,
               preload: tuple[str, ...] = PRELOAD):
    if num_workers is None:
      num_workers = min(8, os.cpu_count() or 1)
    if num_workers < 1 or timeout_s <= 0:
      raise ValueError(f"need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
    self.num_workers, self.timeout_s, self.fallback = num_workers, timeout_s, fallback
    self.memory_mb = memory_mb
    self.stats = collections.Counter()  # submitted, ok, errors, timeouts, crashes, restarts
    self._ctx = multiprocessing.get_context("forkserver")
    self._ctx.set_forkserver_preload(list(preload))
    self._lock = threading.Lock()
    self._pending: collections.deque[int] = collections.deque()
    self._tasks: dict[int, _Task] = {}
    self._ids = itertools.count()
    self._closed = False  # no new tasks (closed or broken)
    self._shut_down = False  # close() ran
    self._broken = ""
    self._startup_failures = 0
    self._wake_r, self._wake_w = socket.socketpair()
    self._wake_r.setblocking(False)
    self._wake_w.setblocking(False)
    self._workers = [self._start_worker() for _ in range(num_workers)]
    self._pid = os.getpid()
    _LIVE.add(self)
    self._thread = threading.Thread(target=self._dispatch_loop, name="reward-pool", daemon=True)
    self._thread.start()

  # ---------------------------------------------------------------- public API

  def submit(self, fn: Callable[..., Any], *args, timeout_s: float | None = None,
             fallback: Any = None, **kwargs) -> concurrent.futures.Future:
    """Queues fn(*args, **kwargs); the future resolves to an Outcome, never raises."""
    # Pickle in the caller so that an unpicklable reward fails loudly where it was submitted.
    payload_id = next(self._ids)
    payload = payload_id.to_bytes(8, "little") + pickle.dumps(
        (fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    future = concurrent.futures.Future()
    task = _Task(payload, future, self.timeout_s if timeout_s is None else timeout_s,
                 self.fallback if fallback is None else fallback,
                 getattr(fn, "__qualname__", repr(fn)))
    with self._lock:
      if self._broken:
        raise RewardPoolBroken(f"RewardPool is broken: {self._broken}")
      if self._closed:
        raise RuntimeError("RewardPool is closed")
      self._tasks[payload_id] = task
      self._pending.append(payload_id)
      self.stats["submitted"] += 1
    self._wake()
    return future

  def close(self) -> None:
    """Stops the dispatcher, resolves queued tasks to their fallback, and kills the workers."""
    with self._lock:
      if self._shut_down:
        return
      self._shut_down = self._closed = True
    self._wake()
    self._thread.join(timeout=10)
    with self._lock:
      for task_id in list(self._tasks):
        self._resolve(task_id, None, "pool closed")
    for w in self._workers:
      w.process.kill()
      w.process.join(timeout=5)
      w.conn.close()
    self._wake_r.close()
    self._wake_w.close()

  def __enter__(self) -> RewardPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ---------------------------------------------------------------- dispatcher

  def _start_worker(self) -> _Worker:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_worker_main, args=(child_conn, self.memory_mb),
                                name="reward-worker", daemon=True)
    process.start()
    child_conn.close()  # So that a dead worker reads as EOF on our end.
    return _Worker(process, parent_conn)

  def _wake(self) -> None:
    try:
      self._wake_w.send(b"x")
    except (BlockingIOError, OSError):
      pass  # Already awake or closing.

  def _resolve(self, task_id: int, value: Any, error: str | None, cpu_s: float = 0.0) -> None:
    """Completes a task's future; must hold self._lock."""
    task = self._tasks.pop(task_id, None)
    if task is None or task.future.done():
      return
    seconds = time.monotonic() - task.started if task.started else 0.0
    if error is None:
      self.stats["ok"] += 1
    else:
      _log.warning("reward task %s failed after %.2fs: %s", task.name, seconds, error)
      value = task.fallback
    task.future.set_result(Outcome(value, error, seconds, cpu_s))

  def _replace(self, i: int, error: str, stat: str) -> None:
    """Kills worker i, fails its task with `error`, and starts a fresh worker; holds the lock."""
    w = self._workers[i]
    w.process.kill()
    w.process.join(timeout=5)
    w.conn.close()
    if w.task_id is not None:
      self._resolve(w.task_id, None, error)
    self.stats[stat] += 1
    self.stats["restarts"] += 1
    self._startup_failures = 0 if w.ready else self._startup_failures + 1
    if self._startup_failures >= _MAX_STARTUP_FAILURES * self.num_workers:
      self._break(f"reward workers die before they start ({error}); is the main module "
                  "import-safe (`if __name__ == '__main__':`) and the preload importable?")
    elif not self._closed:
      self._workers[i] = self._start_worker()

  def _break(self, reason: str) -> None:
    """Gives up: fails every task and refuses new ones, loudly (this is a setup bug)."""
    _log.error("RewardPool broken: %s", reason)
    self._broken, self._closed = reason, True
    for task_id in list(self._tasks):
      self._resolve(task_id, None, _BROKEN + reason)

  def _dispatch_loop(self) -> None:
    try:
      self._dispatch_forever()
    except Exception as e:  # pylint: disable=broad-except  (a bug here must not hang futures)
      _log.exception("reward pool dispatcher failed")
      with self._lock:
        self._break(f"dispatcher failed: {type(e).__name__}: {e}")

  def _dispatch_forever(self) -> None:
    while not self._closed:
      with self._lock:
        self._assign()
        timeout = self._next_deadline()
      waitables = [self._wake_r] + [w.conn for w in self._workers]
      waitables += [w.process.sentinel for w in self._workers]
      ready = multiprocessing.connection.wait(waitables, timeout)
      with self._lock:
        if self._wake_r in ready:
          try:
            while self._wake_r.recv(4096):
              pass
          except (BlockingIOError, OSError):
            pass
        self._collect(ready)
        self._expire()

  def _assign(self) -> None:
    for i, w in enumerate(self._workers):
      if not self._pending:
        return
      if w.task_id is not None or not w.ready:  # Only a started worker's death is the task's.
        continue
      task_id = self._pending.popleft()
      task = self._tasks.get(task_id)
      if task is None:
        continue
      task.started = time.monotonic()
      w.task_id = task_id
      try:
        w.conn.send_bytes(task.payload)
      except (OSError, EOFError) as e:
        self._replace(i, f"worker died before the task: {e}", "crashes")

  def _next_deadline(self) -> float | None:
    busy = [self._tasks[w.task_id] for w in self._workers if w.task_id in self._tasks]
    if not busy:
      return None
    now = time.monotonic()
    return max(0.0, min(t.started + t.timeout_s for t in busy) - now)

  def _collect(self, ready: list) -> None:
    for i, w in enumerate(self._workers):
      if w.conn in ready:
        try:
          message = w.conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError) as e:
          self._replace(i, f"worker died: {type(e).__name__} (exit {w.process.exitcode})",
                        "crashes")
          continue
        if message == _READY:
          w.ready = True
          continue
        task_id, error, value, cpu_s = message
        if error is not None:
          self.stats["errors"] += 1
        w.task_id = None
        self._resolve(task_id, value, error, cpu_s)
      elif w.process.sentinel in ready and not w.process.is_alive():
        self._replace(i, f"worker died (exit {w.process.exitcode})", "crashes")

  def _expire(self) -> None:
    now = time.monotonic()
    for i, w in enumerate(self._workers):
      task = self._tasks.get(w.task_id) if w.task_id is not None else None
      if task is not None and now >= task.started + task.timeout_s:
        self._replace(i, f"timeout after {task.timeout_s:g}s", "timeouts")


_LIVE: weakref.WeakSet[RewardPool] = weakref.WeakSet()


@atexit.register
def _close_open_pools() -> None:
  """At exit, closes this process's pools that are still open.

  Registered after multiprocessing's own exit handler, so it runs first: otherwise that
  handler kills the daemon workers and removes the forkserver's socket while a pool's
  dispatcher still runs, which sees its workers die and fails to start new ones.
  """
  for pool in list(_LIVE):
    if pool._pid == os.getpid():  # pylint: disable=protected-access  (a fork's copy is not ours)
      pool.close()
