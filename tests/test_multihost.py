"""Multi-process runs (r1jax/core/multihost.py), as 2 real processes on this machine:
`jax.distributed` on localhost, 2 CPU devices each (tests/multihost_worker.py)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
sys.path.insert(0, str(WORKER.parent))
import main_runs  # noqa: E402  pylint: disable=wrong-import-position


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(scenario: str, out: Path, heartbeat: int = 30, timeout: float = 180.0):
  """Both processes of `scenario`; [(exit status, stderr, seconds)] per process."""
  env = dict(os.environ)  # each process has 2 devices of its own, not the suite's 8
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  port, start = _free_port(), time.monotonic()
  procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(port), str(i), str(out),
                             str(heartbeat)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=max(timeout - (time.monotonic() - start), 1.0))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{scenario}: a process still ran after {timeout} s")
    results.append((p.returncode, err, time.monotonic() - start))
  return results


@pytest.mark.slow
def test_one_time_work_shares_its_result_and_its_failure(tmp_path):
  """`run_once`: process 0's result reaches process 1 (and gather, any and sum agree
  across processes); when it raises a DataError, both processes stop with exit status 65,
  process 1 naming process 0's error; neither goes on."""
  results = _launch("once", tmp_path)
  assert [r[0] for r in results] == [65, 65], [r[1][-2000:] for r in results]
  assert "DataError (exit 65): data: row 7" in results[0][1]
  assert ("ProcessFailed (exit 65): 'bad-data' failed on process 0: DataError: data: row 7"
          in results[1][1])
  assert not list(tmp_path.glob("went-on-*"))


def test_rows_that_would_land_elsewhere_or_replicate_are_refused(monkeypatch):
  """`to_global` checks that this process's devices hold exactly its block of rows: rows
  replicated over devices (a batch the batch axes do not divide) or another process's block
  are a clear error, never silently wrong rows. Also the cluster settings' own checks."""
  from jax.sharding import NamedSharding, PartitionSpec
  from r1jax.core import multihost, sharding
  mesh = sharding.make_mesh((-1, 1, 1))  # 8 devices, all this process's
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  check = multihost._check_rows  # pylint: disable=protected-access
  check(rows, (16, 4))  # 1 process: all rows are its own
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert multihost.local_rows(16) == slice(8, 16)
  with pytest.raises(ValueError, match=r"hold rows \[0, 1, .* not its block \[8, 16\)"):
    check(rows, (16, 4))
  with pytest.raises(ValueError, match="not its block"):  # replicated rows
    check(NamedSharding(mesh, PartitionSpec()), (16, 4))
  with pytest.raises(ValueError, match="15 rows do not split over 2 processes"):
    multihost.local_rows(15)
  with pytest.raises(ValueError, match="needs num_processes >= 1"):
    multihost.Cluster(coordinator="localhost:1234")
  with pytest.raises(ValueError, match="heartbeat_timeout_s must be >= 1"):
    multihost.Cluster(heartbeat_timeout_s=0)


# --------------------------------------------------------------------------- whole stages


def _main(args: list[str], devices: int, *extra: str) -> subprocess.Popen:
  """`python -m r1jax.main ARGS` on `devices` CPU devices of its own, output captured."""
  env = dict(main_runs.env(None), PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "r1jax.main", *args, f"--cpu_devices={devices}",
                           *extra], cwd=main_runs.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _pair(args: list[str], heartbeat: int = 30) -> list[subprocess.Popen]:
  """The same run as 2 processes of 2 devices each, joined on a localhost coordinator."""
  port = _free_port()
  return [_main(args, 2, "--distributed", f"--coordinator_address=localhost:{port}",
                "--num_processes=2", f"--process_id={i}", f"--heartbeat_timeout_s={heartbeat}")
          for i in range(2)]


def _finish(procs, timeout: float = 300.0) -> list[str]:
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * len(procs), [o[-3000:] for o in outs]
  return outs


STEPS = 24  # enough for a SIGTERM to land before the end; each step takes milliseconds


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
  """An SFT stage with 2 data shards: as 2 processes, and as 1 process on as many devices."""
  from tiny_world import make_world, sft_test_config  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("multihost_sft")
  c = sft_test_config(make_world(root / "world"), steps=STEPS)
  c.data.update(batch=4, shards=2)  # 8 rows in all, 4 per shard
  c.ckpt.update(every=4)
  args = [f"--config={main_runs.config_file(c, root / 'exp.py')}"]
  two, one = root / "two", root / "one"
  _finish(_pair(args + [f"--workdir={two}"]))
  _finish([_main(args + [f"--workdir={one}"], 4)])
  return args, two, one


@pytest.mark.slow
def test_an_sft_stage_as_two_processes_equals_one_and_writes_once(sft_runs):
  """2 processes, each packing its own data shard, train as 1 process reading both shards
  on as many devices (params ≤ 1e-6 apart); metrics, config and final params are written
  once; the checkpoint holds both shards' data states."""
  _, two, one = sft_runs
  _same_params(two, one)
  lines = (two / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(1, STEPS + 1))
  assert sorted(p.name for p in two.glob(".r1jax-run-*.lock")) == [".r1jax-run-0.lock",
                                                                    ".r1jax-run-1.lock"]
  extra = json.loads((two / "checkpoints" / str(STEPS) / "extra" / "metadata").read_text())
  assert set(extra["data"]) == {"0", "1"}  # each process's shard state, gathered




def _same_params(a_dir: Path, b_dir: Path) -> None:
  from r1jax.core import checkpoint  # pylint: disable=import-outside-toplevel
  a, b = checkpoint.load_params(a_dir / "final")[1], checkpoint.load_params(b_dir / "final")[1]
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_a_lost_process_and_a_sigterm_each_stop_both_and_a_relaunch_finishes_alike(sft_runs,
                                                                                   tmp_path):
  """One run, three launches of both processes:
  1. process 1 is killed (SIGKILL) after checkpoint 4: process 0 exits non-zero within the
     5 s heartbeat timeout (plus a margin), its error naming the lost task;
  2. the relaunch resumes; SIGTERM reaches process 1 only, after checkpoint 8: both agree on
     the step, checkpoint it and exit 75;
  3. the next relaunch finishes, with the uninterrupted 2-process run's params (≤ 1e-6)."""
  args, two, _ = sft_runs
  run = tmp_path / "run"
  args = args + [f"--workdir={run}"]
  procs = _pair(args, heartbeat=5)
  main_runs.wait_for_checkpoint(procs[0], run, 4)
  procs[1].kill()
  killed = time.monotonic()
  out0 = procs[0].communicate(timeout=120)[0]
  procs[1].communicate(timeout=30)
  assert procs[0].returncode != 0 and time.monotonic() - killed < 60, out0[-3000:]
  assert re.search(r"[Tt]ask:? ?1 heartbeat timeout|stopped sending heartbeats\):\s*\S*1\b",
                   out0), out0[-3000:]

  procs = _pair(args)
  main_runs.wait_for_checkpoint(procs[0], run, 8)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [75, 75], [o[-3000:] for o in outs]
  stops = [re.findall(r"SIGTERM at step (\d+)", o) for o in outs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  step = int(stops[0][0])
  assert 8 <= step < STEPS and step in main_runs.saved_steps(run), step

  _finish(_pair(args))
  _same_params(run, two)


def test_data_shards_refuse_a_split_they_cannot_make_or_a_state_of_other_shards(monkeypatch):
  """`data.shards` must split over the processes; a checkpoint's data state must hold the
  shards this run reads (clear errors, before any training); shards < 0 is a config error;
  a state saved before shards existed resumes as shard 0 of 1."""
  from r1jax.data import shards
  from r1jax.stages.sft import sft_config, validate
  from tiny_world import MODEL  # pylint: disable=import-outside-toplevel

  class Fake:  # a pipeline's iterator: just a state
    def __init__(self, i):
      self.state, self.counts, self.should_stop = {"i": i}, {}, None

    def get_state(self):
      return self.state

    def set_state(self, state):
      self.state = state

    def __iter__(self):
      return self

    def __next__(self):
      raise StopIteration

  made = lambda i, n: Fake(i)
  it = shards.ShardedIterator(made, 2)  # 1 process reads both
  assert it.get_state() == {"0": {"i": 0}, "1": {"i": 1}} == shards.gather(it.get_state())
  with pytest.raises(ValueError, match=r"has shards \['0', '1', '2'\], this run reads 2"):
    it.set_state({"0": {}, "1": {}, "2": {}})
  old = shards.ShardedIterator(made, 1)
  old.set_state({"i": 7})  # a pre-shards checkpoint: one iterator's own state
  assert old.get_state() == {"0": {"i": 7}}
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert shards.owned(4) == (range(2, 4), 4) and shards.owned(0) == (range(1, 2), 2)
  with pytest.raises(ValueError, match="data.shards=3 do not split over 2 processes"):
    shards.owned(3)
  monkeypatch.undo()
  from r1jax.core.config import model_group  # pylint: disable=import-outside-toplevel
  c = sft_config(steps=2)
  c.model = model_group(**MODEL)
  c.data.shards = -1
  with pytest.raises(ValueError, match="data.shards >= 0"):
    validate(c)
