"""Multi-process runs (r1jax/core/multihost.py), as 2 real processes on this machine:
`jax.distributed` on localhost, 2 CPU devices each (tests/multihost_worker.py)."""

import concurrent.futures
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


def _launch(scenario: str, out: Path, heartbeat: int = 30, timeout: float = 180.0,
            shutdown: int = 10):
  """Both processes of `scenario`; [(exit status, stderr, seconds)] per process."""
  env = dict(os.environ)  # each process has 2 devices of its own, not the suite's 8
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  port, start = _free_port(), time.monotonic()
  procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(port), str(i), str(out),
                             str(heartbeat), str(shutdown)], env=env, stdout=subprocess.DEVNULL,
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


# The coordination service's error when a barrier's peer died (jaxlib 0.10, one line).
PEER_DIED = ("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 "
             "heartbeat timeout. This indicates that the remote task has failed, got preempted,"
             " or crashed unexpectedly. Barrier Id: r1jax/main/barrier/failed/0::0, Task: 1")


def test_a_process_whose_collective_broke_names_the_lost_peer(monkeypatch, caplog):
  """A peer killed mid-collective can reset the connection before its heartbeat lapses: the
  survivor fails first, its 'failed alike' barrier then fails with the service's verdict,
  and it exits naming the lost process rather than claiming it failed alone."""
  from r1jax import main as r1jax_main  # pylint: disable=import-outside-toplevel
  from r1jax.core import multihost  # pylint: disable=import-outside-toplevel

  class Client:
    def __init__(self, error):
      self.error = error

    def wait_at_barrier(self, key, timeout_ms):
      del key, timeout_ms
      raise RuntimeError(self.error)

  class Exited(Exception):
    pass

  def now(code):  # os._exit, as the process would
    raise Exited(code)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(r1jax_main, "_now", now)
  for error, said in ((PEER_DIED, "process 0 stops: lost process 1 (its heartbeat lapsed)"),
                      ("DEADLINE_EXCEEDED: Barrier timed out", "process 0 failed alone")):
    monkeypatch.setattr(multihost, "_client", lambda e=error: Client(e))
    with pytest.raises(multihost.BarrierTimeout) as raised:
      multihost.barrier("failed", timeout_s=1)
    assert raised.value.lost == ((1,) if error is PEER_DIED else ())
    caplog.clear()
    with pytest.raises(Exited, match="3"):
      r1jax_main._fail(3)  # pylint: disable=protected-access
    assert said in caplog.text, caplog.text


@pytest.mark.slow
def test_a_process_that_fails_alone_ends_both_within_the_heartbeat(tmp_path):
  """Process 1 fails where process 0 cannot see it (process 0 waits in a collective): it
  does not wait minutes at JAX's shutdown barrier (120 s here) but exits at once after a
  short wait for the others to fail alike (10 s), and the heartbeat timeout (5 s) ends
  process 0; neither goes on."""
  results = _launch("alone", tmp_path, heartbeat=5, timeout=90.0, shutdown=120)
  assert results[1][0] == 1 and "process 1 failed alone" in results[1][1], results[1][1][-2000:]
  assert results[0][0] != 0 and max(r[2] for r in results) < 60, [r[1][-2000:] for r in results]
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


def test_rows_the_devices_do_not_divide_are_logged_once(caplog, monkeypatch):
  """One process: a micro-batch of 6 rows on a mesh of 8 data devices is not split at all,
  each row computed on all 8: a warning naming the counts, once per shape (8 rows: none)."""
  from r1jax.core import sharding
  from r1jax.train import batches
  monkeypatch.setattr(batches, "_WARNED", set())  # whatever ran before in this process
  mesh = sharding.make_mesh((-1, 1, 1))
  rows = lambda n: batches.SFTBatch(np.zeros((n, 4), np.int32), np.ones((n, 4), bool),
                                    np.ones((n, 4), bool))
  with caplog.at_level("WARNING", logger=batches.__name__):
    for n in (12, 12, 16):
      batches.put_batch(rows(n), 2, mesh)
  said = [r.getMessage() for r in caplog.records if "do not divide" in r.getMessage()]
  assert said == ["6 rows per micro-batch do not divide over the 8 devices of the batch axes: "
                  "they spread over 1, each row computed 8 times; use a multiple of 8 rows"]


def test_step_metrics_combine_over_processes_by_kind(monkeypatch):
  """`reduce_metrics`: counts add, maxima and seconds take the largest, minima the smallest,
  means average (equal rows per process)."""
  from r1jax.core import multihost
  parts = [{"reward/total": 1.0, "reward/accuracy_failures": 1.0, "response_length/max": 9.0,
            "response_length/min": 3.0, "time/rollout": 2.0, "tokens_per_s": 100.0,
            "reward/seconds": 0.5},
           {"reward/total": 0.0, "reward/accuracy_failures": 2.0, "response_length/max": 7.0,
            "response_length/min": 1.0, "time/rollout": 3.0, "tokens_per_s": 50.0,
            "reward/seconds": 0.25}]
  assert multihost.reduce_metrics(parts[0]) == parts[0]  # one process: as is
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost, "gather_json", lambda value: parts)
  assert multihost.reduce_metrics(parts[0]) == {
      "reward/total": 0.5, "reward/accuracy_failures": 3.0, "response_length/max": 9.0,
      "response_length/min": 1.0, "time/rollout": 3.0, "tokens_per_s": 150.0,
      "reward/seconds": 0.5}


def test_each_process_takes_its_block_of_every_batch(monkeypatch):
  """`host_share` / `host_indices`: with 2 processes, batches of 8 split 4 + 4, the short
  last batch padded with its first entry (the global batch one process would feed), its
  real entries all process 0's; a batch that does not split is refused; stages not written
  for several processes refuse them, and so are reward models on devices of their own."""
  import copy  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from r1jax.core import errors, multihost
  from r1jax.rewards.reward_model import check_processes
  items = list(range(20))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for pid, want in ((0, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]),
                    (1, [4, 5, 6, 7, 12, 13, 14, 15])):
    monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
    assert multihost.host_indices(20, 8) == want
    shares = [multihost.host_share(items[lo:lo + 8], 8) for lo in (0, 8, 16)]
    assert [x for chunk, real in shares for x in chunk[:real]] == want
    assert shares[2] == (([16, 17, 18, 19], 4) if pid == 0 else ([16, 16, 16, 16], 0))
  with pytest.raises(ValueError, match="a batch of 7 does not split over 2 processes"):
    multihost.host_share(items[:7], 7)
  with pytest.raises(errors.ConfigError, match="the reward_model stage runs in one process"):
    multihost.single_process_only("reward_model")
  own = ml_collections.ConfigDict({"rewards": {"models": [{"name": "helpful"}]},
                                    "mesh": {"reward_devices": 2}})
  with pytest.raises(errors.ConfigError, match="generate: mesh.reward_devices gives"):
    check_processes("generate", own)
  shared = copy.deepcopy(own)
  shared.mesh.reward_devices = 0
  check_processes("generate", shared)  # 32 rows a forward: 16 from each
  shared.rewards.models = [{"name": "helpful", "batch_size": 3}]
  with pytest.raises(errors.ConfigError, match="'helpful' has batch_size 3, which 2 processes"):
    check_processes("generate", shared)
  monkeypatch.undo()
  assert multihost.host_indices(20, 8) == items and multihost.host_share(items[16:], 8) == (
      [16, 17, 18, 19, 16, 16, 16, 16], 4)
  multihost.single_process_only("reward_model")
  check_processes("generate", own)


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


def _outputs(procs, timeout: float) -> list[str]:
  """Each process's output once all ended, read side by side: a process whose pipe nobody
  reads blocks once it is full, and its peers with it, in a collective."""
  with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
    return list(pool.map(lambda p: p.communicate(timeout=timeout)[0], procs))


def _finish(procs, timeout: float = 300.0) -> list[str]:
  outs = _outputs(procs, timeout)
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




def _random_rm(path: Path) -> str:
  """A saved reward model of the tiny shape whose head is random (scores differ by row)."""
  from tiny_world import MODEL  # pylint: disable=import-outside-toplevel
  from r1jax.core.config import model_config, model_group
  from r1jax.rewards import reward_model as rm
  cfg = model_config(model_group(**MODEL))
  params = rm.init_rm(cfg, jax.random.key(0))
  params["head"] = {"w": jax.random.normal(jax.random.key(1), (cfg.hidden,)),
                    "b": jax.numpy.zeros(())}
  rm.save_rm(path, params, cfg)
  return str(path)


@pytest.fixture(scope="module")
def sampling_runs(tmp_path_factory):
  """A pipeline of a generate stage (20 prompts in batches of 8: the last one's 4 all fall
  to process 0; a reward model among its rewards), an eval stage and two RL stages (2 steps,
  evals at 0 and 2; 2 steps one step off policy, a reward model among its rewards), as
  2 processes of 2 devices and as 1 process of 4."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from tiny_world import (  # pylint: disable=import-outside-toplevel
      MODEL, make_world, rl_test_config)
  from r1jax.core.config import eval_group, model_group
  from r1jax.stages.eval import eval_config
  from r1jax.stages.generate import generate_config
  root = tmp_path_factory.mktemp("multihost_sampling")
  world = make_world(root / "world")
  g = generate_config()
  g.tokenizer, g.model = world["tokenizer"], model_group(**MODEL)
  g.data.update(prompts=world["rl_train"], template="plain", max_prompt_tokens=32, limit=20)
  g.sampler.update(max_new_tokens=10, temperature=1.0, top_p=1.0)
  g.k, g.batch_prompts, g.progress, g.tensorboard = 2, 8, False, False
  g.rewards.num_workers = 1
  g.filters.update(verifier="", truncated=False)
  g.select.per_prompt = 1
  judge = {"name": "judge", "path": _random_rm(root / "rm"), "tokenizer": world["tokenizer"],
           "template": "plain", "max_len": 48, "batch_size": 4}
  g.rewards.models = [judge]  # its last batch's forward has no rows of process 1
  g.rewards.components = list(g.rewards.components) + [
      {"name": "judge", "weight": 0.5, "fields": {"prompt": "question"}}]
  e = eval_config()
  e.tokenizer, e.model = world["tokenizer"], model_group(**MODEL)
  e.eval = eval_group(benchmarks=world["held_out"], k=2, max_new_tokens=10, batch_size=8,
                      template="plain", max_prompt_tokens=32)
  e.tensorboard = False
  r = rl_test_config(world, steps=2)  # β > 0: the reference's log-probs beside each rollout
  r.eval.update(benchmarks=world["held_out"], every=2)
  o = rl_test_config(world, steps=2)
  o.grpo.overlap = "rewards"  # step n + 1 sampled before, and scored during, update n
  # …and scored by a reward model too (random head), normalised by its running statistics.
  o.rewards.models = [dict(judge, norm="running")]
  o.rewards.components = list(o.rewards.components) + [
      {"name": "judge", "weight": 0.5, "fields": {"prompt": "question"}}]
  c = ml_collections.ConfigDict(dict(stage="pipeline", seed=0, allow_changes="",
                                     order=("generate", "eval", "rl", "rl_overlap"),
                                     generate=g, eval=e, rl=r, rl_overlap=o))
  args = [f"--config={main_runs.config_file(c, root / 'exp.py')}"]
  two, one = root / "two", root / "one"
  per_host = [f"--config.{name}.data.batch=2" for name in ("rl", "rl_overlap")]  # 2 + 2 = 4
  _finish(_pair(args + [f"--workdir={two}"] + per_host))
  _finish([_main(args + [f"--workdir={one}"], 4)])
  return two, one


@pytest.mark.slow
def test_generate_as_two_processes_equals_one_and_writes_summary_once(sampling_runs):
  """Each process feeds its half of every batch and writes its own rows: the two files hold
  exactly the 1-process run's rows (same samples, rewards and selections); summary.json's
  counts are the 1-process run's."""
  from r1jax.generation.output import read_rows  # pylint: disable=import-outside-toplevel
  two, one = (d / "generate" for d in sampling_runs)
  assert sorted(p.name for p in two.glob("samples-h*.jsonl")) == [
      "samples-h00000.jsonl", "samples-h00001.jsonl"]
  for name in ("samples", "stats"):
    key = lambda r: json.dumps(r, sort_keys=True)
    rows2, rows1 = sorted(read_rows(two, name), key=key), sorted(read_rows(one, name), key=key)
    judged = [[r.get("rewards", {}).pop("judge", None) for r in rows] for rows in (rows2, rows1)]
    assert rows2 == rows1 and len(rows1) >= (20 if name == "stats" else 1), name
    # The reward model's forward sums across devices (FSDP), over gloo between processes:
    # its scores agree to float32 rounding, not bit for bit.
    if name == "samples":
      assert None not in judged[1]
      assert judged[0] == pytest.approx(judged[1], rel=1e-5, abs=1e-5)
  counts = lambda d: {k: v for k, v in json.loads((d / "summary.json").read_text()).items()
                      if k in ("prompts", "samples", "accepted", "selected", "tokens")}
  assert counts(two) == counts(one) and counts(one)["prompts"] == 20


@pytest.mark.slow
def test_eval_as_two_processes_equals_one(sampling_runs):
  """Each process samples and grades its half of the benchmark; the merged report (every
  question, in benchmark order, with its completions) is the 1-process run's."""
  two, one = (d / "eval" for d in sampling_runs)
  read = lambda d: json.loads((d / "eval" / "held_out.json").read_text())
  r2, r1 = read(two), read(one)
  assert r2["questions"] == r1["questions"] and len(r1["questions"]) == 8
  assert r2["summary"] == r1["summary"]
  completions = lambda d: (d / "eval" / "held_out.completions.jsonl").read_text()
  assert completions(two) == completions(one)


@pytest.mark.slow
def test_rl_as_two_processes_equals_one(sampling_runs):
  """GRPO with each process sampling, scoring and packing its half of the prompts (and the
  reference's log-probs of its rows) trains as 1 process on 4 devices: params ≤ 1e-6 apart
  after 2 steps; the metrics, written once, agree (held-out evals included). One step off
  policy (grpo.overlap="rewards", the reference inside the update) as well, with a reward
  model scoring every process's rows in one forward and normalising them by the running
  statistics of all of them (params ≤ 1e-5 apart: its scores agree to float32 rounding)."""
  read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  for stage, steps, keys in (("rl", range(3), ()),
                             ("rl_overlap", range(1, 3), ("reward/judge",))):
    two, one = (d / stage for d in sampling_runs)
    # the reward model's scores agree to float32 rounding (see the generate test); AdamW
    # scales those last bits up where a gradient's terms nearly cancel (measured 1.7e-6)
    _same_params(two, one, atol=1e-5 if keys else 1e-6)
    m2, m1 = read(two), read(one)
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(steps)  # 0: its evals
    for a, b in zip(m2, m1):
      for key in ("reward/total", "reward/accuracy", "response_length/mean", "loss",
                  "eval/held_out/pass@1", "eval/held_out/mean_tokens", *keys):
        if key in b:
          assert a[key] == pytest.approx(b[key], abs=1e-5), (stage, a["step"], key)
    for key in keys:  # scored at every step, no sample failed
      assert all(m[f"{key}_failures"] == 0 for m in m2 + m1), (stage, key)


def _same_params(a_dir: Path, b_dir: Path, atol: float = 1e-6) -> None:
  from r1jax.core import checkpoint  # pylint: disable=import-outside-toplevel
  a, b = checkpoint.load_params(a_dir / "final")[1], checkpoint.load_params(b_dir / "final")[1]
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
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
  assert re.search(r"[Tt]ask:? ?1 heartbeat timeout|stopped sending heartbeats\):\s*\S*1\b|"
                   r"lost process 1\b", out0), out0[-3000:]

  procs = _pair(args)
  main_runs.wait_for_checkpoint(procs[0], run, 8)
  procs[1].send_signal(signal.SIGTERM)
  outs = _outputs(procs, 120)
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
