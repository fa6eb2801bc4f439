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


def _rm_stage(world: dict, root: Path):
  """A reward_model stage on the tiny world's questions (a right answer preferred to a wrong
  one): 4 steps of 8 pairs in 2 micro-batches, held-out accuracy at steps 2 and 4 on 12
  pairs (batches of 8: the last one's 4 all fall to process 0)."""
  from tiny_world import MODEL  # pylint: disable=import-outside-toplevel
  from r1jax.core.config import model_group
  from r1jax.stages.reward_model import reward_model_config
  rows = [json.loads(l) for l in Path(world["rl_train"]).read_text().splitlines()]
  pairs = [{"prompt": r["question"], "chosen": f"The answer is {r['answer']}.",
            "rejected": f"The answer is {r['answer']}0."} for r in rows]
  for name, part in (("train", pairs[:40]), ("eval", pairs[40:52])):
    (root / f"pairs_{name}.jsonl").write_text("\n".join(json.dumps(p) for p in part) + "\n")
  p = reward_model_config(steps=4)
  p.tokenizer, p.model = world["tokenizer"], model_group(**MODEL)
  p.data.update(train=str(root / "pairs_train.jsonl"), eval=str(root / "pairs_eval.jsonl"),
                template="plain", max_len=48, batch=8)
  p.opt.update(lr=1e-3, warmup_steps=1)
  p.microbatches, p.eval_every, p.log_every, p.tensorboard = 2, 2, 1, False
  return p


@pytest.fixture(scope="module")
def sampling_runs(tmp_path_factory):
  """A pipeline of a generate stage (20 prompts in batches of 8: the last one's 4 all fall
  to process 0; a reward model among its rewards), an eval stage, three RL stages (2 steps,
  evals at 0 and 2; 2 steps one step off policy; the same with a reward model among its
  rewards) and a reward_model stage, as 2 processes of 2 devices and as 1 process of 4."""
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
  # step n + 1 sampled during update n: as "rewards" in 2 processes (sampled, and with the
  # reward model below scored, before the update: stages/rl.before_update), as itself in 1
  o.grpo.overlap = "rollout"
  # …and scored by a reward model too (random head), normalised by its running statistics.
  o.rewards.models = [dict(judge, norm="running")]
  o.rewards.components = list(o.rewards.components) + [
      {"name": "judge", "weight": 0.5, "fields": {"prompt": "question"}}]
  # Adam's eps above the float32 noise those scores leave in a gradient: at 1e-8 AdamW's
  # g / (|g| + eps) turned it into a step of ~1 % of lr on a near-zero component (1.25e-5
  # on an AMD EPYC host, 1.7e-6 on the one this test was written on)
  o.opt.eps = 1e-6
  a = rl_test_config(world, steps=2)  # the same overlap, rule rewards only
  a.grpo.overlap = "rollout"
  c = ml_collections.ConfigDict(dict(
      stage="pipeline", seed=0, allow_changes="",
      order=("generate", "eval", "rl", "rl_ahead", "rl_overlap", "rm"), generate=g, eval=e,
      rl=r, rl_ahead=a, rl_overlap=o, rm=_rm_stage(world, root)))
  args = [f"--config={main_runs.config_file(c, root / 'exp.py')}"]
  two, one = root / "two", root / "one"
  per_host = [f"--config.{name}.data.batch=2"  # 2 + 2 = 4
              for name in ("rl", "rl_ahead", "rl_overlap")]
  outs = _finish(_pair(args + [f"--workdir={two}"] + per_host))
  assert all("grpo.overlap='rollout' runs as 'rewards' in 2 processes" in o for o in outs)
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
  policy (the reference inside the update) as well: grpo.overlap="rollout", which the 2
  processes run as "rewards", the 1 process as itself (≤ 1e-6); and so again with a reward
  model scoring every process's rows in one forward and normalising them by the running
  statistics of all of them (params ≤ 1e-5 apart: its scores agree to float32 rounding)."""
  read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  for stage, steps, keys in (("rl", range(3), ()), ("rl_ahead", range(1, 3), ()),
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


@pytest.mark.slow
def test_a_reward_model_stage_as_two_processes_equals_one(sampling_runs):
  """Each process feeds its 4 of every step's 8 pairs and scores its block of every
  held-out batch: the reward model equals 1 process's (≤ 1e-6), the held-out accuracy and
  norm.json (written once, over all 24 responses) agree."""
  from r1jax.rewards import reward_model as rm  # pylint: disable=import-outside-toplevel
  two, one = (d / "rm" for d in sampling_runs)
  a, b = (rm.load_rm(d / "reward_model")[1] for d in (two, one))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  m2, m1 = read(two), read(one)
  assert [m["step"] for m in m2] == [m["step"] for m in m1] == [1, 2, 3, 4]
  for x, y in zip(m2, m1):
    for key in ("rm/loss", "rm/accuracy", "rm/eval_accuracy"):
      assert x.get(key) == pytest.approx(y.get(key), abs=1e-6), (x["step"], key)
  assert [m["step"] for m in m2 if "rm/eval_accuracy" in m] == [2, 4]
  f2, f1 = (json.loads((d / "reward_model" / "norm.json").read_text()) for d in (two, one))
  assert f2["responses"] == f1["responses"] == 24
  assert f2 == pytest.approx(f1, abs=1e-6)


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

