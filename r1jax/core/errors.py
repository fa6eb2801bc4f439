"""The ways a run ends other than finishing, each with its own exit status, and the workdir lock.

A scheduler or retry loop reads the exit status of `python -m r1jax.main`:
  0   the stage finished;
  75  preempted: a checkpoint was saved on SIGTERM; run the same command again (EX_TEMPFAIL);
  64  ConfigError: the config was refused (a NaN or inf field, a bad value); fix the config;
  65  DataError: an input file was refused (unreadable as its format, too many unusable rows);
  69  NonFiniteError: training became non-finite (NaN/inf loss, gradient or weights), or the
      final weights were; nothing non-finite was saved as a checkpoint or as final/;
  73  WorkdirLocked: another live run holds the workdir;
  74  SaveFailed: a checkpoint save failed; the newest good checkpoint is still there;
  1   anything else.
Each error subclasses ValueError or RuntimeError as well, so code that catches those still does.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from r1jax.core import storage
from r1jax.core.storage import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75


class RunError(Exception):
  """An error that ends a run with `exit_code`."""

  exit_code = 1


class ConfigError(RunError, ValueError):
  exit_code = 64


class DataError(RunError, ValueError):
  exit_code = 65


class NonFiniteError(RunError, RuntimeError):
  exit_code = 69


class WorkdirLocked(RunError, RuntimeError):
  exit_code = 73


class SaveFailed(RunError, RuntimeError):
  exit_code = 74


def exit_code(error: BaseException) -> int:
  return getattr(error, "exit_code", 1)


class WorkdirLock:
  """An exclusive OS lock (flock) on WORKDIR/.r1jax-run-<process>.lock, held for one run.

  The file names its holder (host, pid, start time), so a refused second run says who holds
  the workdir. The kernel drops the lock when its process dies, however it dies; a file that
  still names a holder but is not locked was left by a dead run, and is taken over with a
  warning. One lock per process, so each host of a multi-host run holds its own. An object
  store (`gs://`) has no such lock: there the run goes on unlocked, with a warning.
  """

  def __init__(self, workdir: str | Path, process_index: int = 0):
    self.path = storage.path(workdir) / f".r1jax-run-{process_index}.lock"
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    if storage.is_remote(self.path):
      log.warning("%s is on an object store, which has no lock: nothing stops a second run "
                  "on this workdir; run one at a time", self.path.parent)
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirLocked(f"{self.path.parent} is in use by another run "
                          f"({self._holder() or 'holder unknown'}); one run per workdir. "
                          f"Wait for it to end, or stop it, then run again.") from None
    previous = self._holder()
    if previous:
      log.warning("%s: taking over the lock of a run that is gone (%s)", self.path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
    self._fd = fd
    return self

  def _holder(self) -> str:
    try:
      who = json.loads(self.path.read_text())
      return f"host {who['host']}, pid {who['pid']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
      return ""

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # kept, not unlinked: a waiting opener must not lock a ghost
      os.close(self._fd)
      self._fd = None
