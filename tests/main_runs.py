"""Helpers for tests that run `python -m r1jax.main` in a subprocess and interrupt it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def config_file(config, path: Path) -> Path:
  """An experiment file that rebuilds `config` (so a subprocess runs exactly it)."""
  (path.parent / "config.json").write_text(config.to_json())
  path.write_text(
      "import json, pathlib, ml_collections\n"
      "def get_config(arg=None):\n"
      f"  d = json.loads(pathlib.Path({str(path.parent / 'config.json')!r}).read_text())\n"
      "  c = ml_collections.ConfigDict(d)\n"
      "  c.lock()\n"
      "  return c\n")
  return path


def xla_flags(devices: int | None = 8) -> str:
  """This session's XLA_FLAGS (conftest's compile settings) with `devices` fake CPU devices
  (None: no device count, so a run picks its own)."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
  return " ".join(kept + count)


def env(devices: int | None = 8) -> dict[str, str]:
  """The environment of a subprocess the tests start: this one's, on `devices` CPU devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")


def start(*args: str) -> subprocess.Popen:
  """`python -m r1jax.main ARGS` on 8 fake CPU devices, output captured."""
  return subprocess.Popen([sys.executable, "-m", "r1jax.main", *args], cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600, returncode: int = 0) -> str:
  """Its output, once it exited with `returncode` (0: finished; 75: preempted)."""
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == returncode, (proc.returncode, out[-4000:])
  return out


def wait_for_checkpoint(proc, workdir: Path, step: int, timeout: float = 300) -> None:
  """Blocks until checkpoint `step` is committed (orbax renames its temp dir on commit)."""
  deadline = time.monotonic() + timeout
  target = workdir / "checkpoints" / str(step)
  while not target.is_dir():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-4000:]}")
    assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
    time.sleep(0.02)


def kill_after_checkpoint(proc, workdir: Path, step: int) -> None:
  """SIGKILL (no chance to save) once checkpoint `step` is committed."""
  wait_for_checkpoint(proc, workdir, step)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


def saved_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_bit_exact(a, b) -> None:
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
