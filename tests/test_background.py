"""core/background.py: one way to collect background work, and one way for it to fail."""

import threading
import time

import pytest

from r1jax.core import background


def test_a_thread_result_is_collected_once_and_chained():
  calls = []

  def work(x):
    calls.append(threading.current_thread().name)
    time.sleep(0.05)
    return x * 2

  pending = background.in_thread("test-bg", work, 21)
  chained = pending.then(lambda v: v + 1)
  assert chained.wait() >= 0.0 and pending.error is None
  assert chained.result() == 43 and pending.result() == 42 and pending.result() == 42
  assert len(calls) == 1 and calls[0].startswith("test-bg")


def test_an_error_surfaces_in_the_caller_the_same_way_every_time():
  def boom():
    raise ValueError("reward exploded")

  pending = background.in_thread("test-bg", boom)
  assert pending.wait() >= 0.0  # waiting never raises
  assert isinstance(pending.error, ValueError)
  for _ in range(2):
    with pytest.raises(ValueError, match="reward exploded"):
      pending.result()
  ran = []
  chained = pending.then(lambda v: ran.append(v))
  with pytest.raises(ValueError, match="reward exploded"):
    chained.result()
  assert not ran  # a step chained on failed work never runs


def test_one_job_at_a_time_per_name():
  started, release = threading.Event(), threading.Event()
  first = background.in_thread("test-serial", lambda: (started.set(), release.wait(5))[1])
  second = background.in_thread("test-serial", lambda: "second")
  assert started.wait(5)
  time.sleep(0.05)
  assert second._outcome is None and not second._future.done()  # queued behind the first
  release.set()
  assert first.result() is True and second.result() == "second"
