"""Work the main loop starts now and collects later: one way to wait, one way to fail.

Every piece of such work is a `Pending`:
- a batch of rewards in flight (rewards/compose.py `PendingRewards`: pool workers, reward
  models on the device, inline rewards run when collected);
- the generate stage's graded batch (`then` on those rewards: decoding the next batch
  overlaps the pool);
- the RL rollout one step ahead (`in_thread`, stages/rl_ahead.py).
`result()` blocks and returns the value, or raises in the caller's thread the error the work
raised, the same error on every call; `wait()` only waits and says how long; `then(fn)`
chains a step to run on the value when it is collected.
"""

from __future__ import annotations

import abc
import concurrent.futures
import functools
import time
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Pending(abc.ABC, Generic[T]):
  """A value being computed elsewhere (a thread, a process pool, the device)."""

  _outcome: tuple[bool, Any] | None = None  # (ok, value or exception), once collected

  @abc.abstractmethod
  def _collect(self) -> T:
    """Blocks until the work is done; returns its value or raises its error."""

  def _settle(self) -> tuple[bool, Any]:
    if self._outcome is None:
      try:
        self._outcome = (True, self._collect())
      except Exception as e:  # pylint: disable=broad-except  (re-raised by result())
        self._outcome = (False, e)
    return self._outcome

  def result(self) -> T:
    ok, value = self._settle()
    if not ok:
      raise value
    return value

  def wait(self) -> float:
    """Seconds spent waiting until the work was done; its error, if any, stays for result()."""
    t0 = time.perf_counter()
    self._settle()
    return time.perf_counter() - t0

  @property
  def error(self) -> BaseException | None:
    """The work's error once it is done (waits for it), else None."""
    ok, value = self._settle()
    return None if ok else value

  def then(self, fn: Callable[[T], U]) -> Pending[U]:
    """A Pending of fn(value), run in the caller's thread when it is collected."""
    return _Then(self, fn)


class _Then(Pending[U]):

  def __init__(self, first: Pending[T], fn: Callable[[T], U]):
    self._first, self._fn = first, fn

  def _collect(self) -> U:
    return self._fn(self._first.result())


class _Future(Pending[T]):

  def __init__(self, future: concurrent.futures.Future):
    self._future = future

  def _collect(self) -> T:
    return self._future.result()


def in_thread(name: str, fn: Callable[..., T], *args: Any) -> Pending[T]:
  """Runs fn(*args) on the one worker thread named `name` (one job at a time per name)."""
  return _Future(_executor(name).submit(fn, *args))


@functools.cache
def _executor(name: str) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
