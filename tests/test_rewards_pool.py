"""RewardPool: results, failures become fallbacks, hung and dead workers are replaced, overlap."""

import ctypes
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from r1jax.rewards import pool as pool_lib


# Task functions: module-level so that workers can unpickle them by name.
def _square(x):
  return x * x


def _raise(msg):
  raise ValueError(msg)


def _spin():
  while True:  # A pure-Python hang: only a hard kill ends it.
    pass


def _sleep(seconds, value=1.0):
  time.sleep(seconds)
  return value


def _exit_hard():
  os._exit(3)


def _kill_self():
  os.kill(os.getpid(), signal.SIGKILL)


def _segfault():
  ctypes.string_at(0)


def _allocate(mb):
  return len(bytearray(mb << 20))


def _unpicklable_result():
  return lambda: None


def _exit_cleanly():
  raise SystemExit(0)


def _burn(seconds):
  end = time.process_time() + seconds
  while time.process_time() < end:
    pass
  return seconds


@pytest.fixture(scope="module")
def pool():
  with pool_lib.RewardPool(num_workers=2, timeout_s=1.0, fallback=-1.0, memory_mb=512) as p:
    yield p


def _run(pool, fn, *args):
  """The value of one task, as the reward composer reads it (a broken pool raises)."""
  return pool.submit(fn, *args).result(timeout=30).value_or_raise()


def test_results_and_cpu_time(pool):
  futures = [pool.submit(_square, i) for i in range(20)]
  assert [f.result().value for f in futures] == [i * i for i in range(20)]
  assert all(f.result().ok for f in futures)
  burnt = pool.submit(_burn, 0.05).result()
  assert 0.05 <= burnt.cpu_s < burnt.seconds + 0.01  # The worker's CPU time is reported.


@pytest.mark.parametrize("fn, args, error", [
    (_raise, ("boom",), "ValueError: boom"),
    (_exit_hard, (), "worker died"),
    (_kill_self, (), "worker died"),
    (_segfault, (), "worker died"),
    (_allocate, (2048,), "MemoryError"),  # Above memory_mb: an error, not an OOM kill.
    (_unpicklable_result, (), "unpicklable result"),
    (_exit_cleanly, (), "SystemExit"),
])
def test_failures_become_fallbacks_and_pool_recovers(pool, fn, args, error):
  outcome = pool.submit(fn, *args).result(timeout=30)
  assert outcome.value == -1.0 and not outcome.ok and error in outcome.error, outcome
  assert _run(pool, _square, 7) == 49  # Still serving afterwards.


def test_hung_tasks_time_out_and_workers_are_replaced(pool):
  restarts = pool.stats["restarts"]
  start = time.monotonic()
  hung = [pool.submit(_spin) for _ in range(2)] + [pool.submit(_sleep, 30)]
  ok = pool.submit(_square, 3, timeout_s=5)
  outcomes = [f.result(timeout=30) for f in hung]
  assert all(o.error.startswith("timeout") and o.value == -1.0 for o in outcomes)
  assert ok.result(timeout=30).value == 9
  # Three 1 s timeouts on two workers: about 2 s, never the 30 s the tasks asked for.
  assert time.monotonic() - start < 6
  assert pool.stats["restarts"] - restarts == 3


def test_per_task_timeout_and_fallback(pool):
  outcome = pool.submit(_sleep, 0.5, 2.0, timeout_s=3).result(timeout=30)
  assert outcome.value == 2.0 and outcome.ok
  outcome = pool.submit(_sleep, 5, timeout_s=0.2, fallback=0.25).result(timeout=30)
  assert outcome.value == 0.25 and "timeout" in outcome.error


def test_workers_run_in_parallel(pool):
  start = time.monotonic()
  futures = [pool.submit(_sleep, 0.4) for _ in range(4)]
  assert [f.result(timeout=30).value for f in futures] == [1.0] * 4
  assert time.monotonic() - start < 1.4  # 2 rounds of 0.4 s, not 4.


def test_overlap_with_device_work(pool):
  """Rewards submitted before a (simulated) device step finish while it runs."""
  _run(pool, _square, 1)  # Workers warm.
  start = time.monotonic()
  futures = [pool.submit(_sleep, 0.3) for _ in range(4)]  # ~0.6 s of reward work.
  time.sleep(1.0)  # The device step.
  assert all(f.result().ok for f in futures)
  assert time.monotonic() - start < 1.3  # max(1.0, 0.6) + small, not 1.6.


def test_bad_input_and_close():
  with pytest.raises(ValueError, match="num_workers"):
    pool_lib.RewardPool(num_workers=0)
  p = pool_lib.RewardPool(num_workers=1, timeout_s=5)
  with pytest.raises(Exception, match="pickle|attribute|lambda"):
    p.submit(lambda: 1)
  running = p.submit(_sleep, 3)
  queued = p.submit(_sleep, 3)
  time.sleep(0.2)
  start = time.monotonic()
  p.close()
  assert time.monotonic() - start < 3
  assert running.result(timeout=1).error == "pool closed"
  assert queued.result(timeout=1).error == "pool closed"
  with pytest.raises(RuntimeError, match="closed"):
    p.submit(_square, 2)


def test_workers_that_cannot_start_break_the_pool_loudly(tmp_path):
  """A setup bug must not turn into silent fallbacks forever: here, the classic main module
  without `if __name__ == "__main__":`, which every worker re-runs (and dies in) at start-up."""
  script = tmp_path / "unguarded_main.py"
  script.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
      "from r1jax.rewards import pool\n"
      "p = pool.RewardPool(num_workers=1, timeout_s=5, preload=())\n"
      "print('RESULT', p.submit(abs, -2).result(timeout=60).error)\n"
      "try:\n"
      "    p.submit(abs, -2)\n"
      "except RuntimeError as e:\n"
      "    print('REFUSED', e)\n"
      "p.close()\n")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, check=False)
  assert "RESULT pool broken" in out.stdout and "REFUSED RewardPool is broken" in out.stdout, (
      out.stdout + out.stderr[-2000:])


def test_unguarded_script_gets_an_exception_not_a_wrong_reward(tmp_path):
  """A reward scored in a pool started from a script without a __main__ guard: every worker
  re-runs the script and dies, so a correct answer could score 0.0. Reading it raises, naming
  the fix."""
  script = tmp_path / "score.py"
  script.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
      "from r1jax.rewards.math import accuracy_reward\n"
      "from r1jax.rewards.pool import RewardPool\n"
      "try:\n"
      "  outcome = RewardPool(num_workers=2).submit(accuracy_reward, 'so \\\\boxed{4}', '4')\n"
      "  print('VALUE', outcome.result().value_or_raise(), flush=True)\n"
      "except Exception as e:\n"
      "  print('RAISED', type(e).__name__, str(e).replace(chr(10), ' '), flush=True)\n"
      "  raise\n")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=180, check=False, cwd=tmp_path)
  assert "VALUE" not in out.stdout, out.stdout
  assert out.returncode != 0
  # One flushed line each. The dying workers write to the same pipe, and one killed while
  # printing can leave a fragment that the parent's line then continues ("RAISEDRAISED …").
  mark = "RAISED RewardPoolBroken"
  raised = [l[l.index(mark):] for l in out.stdout.splitlines() if mark in l]
  assert raised and "RewardPool is broken" in raised[0], out.stdout[-3000:]
  assert "if __name__ == '__main__':" in raised[0]


def test_task_whose_module_cannot_load_fails_alone(pool, monkeypatch):
  """A function the worker cannot import is that task's error; the worker keeps serving."""
  module = types.ModuleType("r1jax_parent_only_module")  # Exists in this process only.
  module.fn = lambda: 1
  module.fn.__module__, module.fn.__qualname__ = module.__name__, "fn"
  monkeypatch.setitem(sys.modules, module.__name__, module)
  restarts = pool.stats["restarts"]
  outcome = pool.submit(module.fn).result(timeout=30)
  assert "ModuleNotFoundError" in outcome.error and outcome.value == -1.0
  assert _run(pool, _square, 5) == 25 and pool.stats["restarts"] == restarts


def test_a_pool_left_open_at_exit_ends_quietly(tmp_path):
  """Exit closes every open pool before multiprocessing kills the workers and removes the
  forkserver's socket: no dispatcher sees its workers die and fails to restart them."""
  script = tmp_path / "left_open.py"
  script.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
      "from r1jax.rewards import pool\n"
      "if __name__ == '__main__':\n"
      "  pools = [pool.RewardPool(num_workers=2, preload=()) for _ in range(3)]\n"
      "  print('RESULT', [p.submit(abs, -2).result().value for p in pools], flush=True)\n")
  for _ in range(3):  # the failure it guards against is a race at exit: try a few times
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and "RESULT [2, 2, 2]" in out.stdout, out.stderr[-2000:]
    assert out.stderr == "", out.stderr[-2000:]
