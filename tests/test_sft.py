"""The SFT stage: exact packing (segments never see each other), loss goes down, resume, errors."""

import json
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import stages
from r1jax.stages import sft as sft_stage
from r1jax.core import attention, checkpoint, model
from r1jax.core.config import ModelConfig
from r1jax.core.errors import DataError, SaveFailed
from r1jax.core.metrics import read_metrics
from r1jax.main import EXIT_PREEMPTED
from r1jax.train import losses

import main_runs
from test_checkpoint import DAMAGE
from tiny_world import make_world, sft_test_config

CFG = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  mlp_dim=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.slow
def test_packed_loss_equals_the_documents_scored_alone():
  """Two documents packed in one row with segment ids == each scored in its own row."""
  params = model.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  a, b = rng.integers(4, 64, 7), rng.integers(4, 64, 5)
  p = 16
  packed = np.zeros((1, p), np.int32)
  packed[0, :7], packed[0, 7:12] = a, b
  seg = np.zeros((1, p), np.int32)
  seg[0, :7], seg[0, 7:12] = 1, 2
  pos = np.zeros((1, p), np.int32)
  pos[0, :7], pos[0, 7:12] = np.arange(7), np.arange(5)
  mask, target = seg > 0, seg > 0
  target[0, [0, 7]] = False  # a document's first token has no context
  plan = attention.plan(jnp.asarray(mask), jnp.asarray(seg))
  loss, sums = losses.sft_loss(params, CFG, jnp.asarray(packed), plan, jnp.asarray(target),
                               positions_NxQ=jnp.asarray(pos))
  nll = 0.0
  for doc in (a, b):
    toks = jnp.asarray(doc[None].astype(np.int32))
    ones = jnp.ones(toks.shape, bool)
    _, s = losses.sft_loss(params, CFG, toks, attention.plan(ones), ones.at[0, 0].set(False))
    nll += float(s["nll"])
  np.testing.assert_allclose(float(sums["nll"]), nll, rtol=1e-5)
  assert float(sums["tokens"]) == 10
  # Without segment ids the second document attends to the first: the loss differs.
  _, leaky = losses.sft_loss(params, CFG, jnp.asarray(packed), attention.plan(jnp.asarray(mask)),
                             jnp.asarray(target))
  assert abs(float(leaky["nll"]) - nll) > 1e-3


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
  """6 SFT steps, a checkpoint every 2: the run every resumed one must reproduce."""
  path = tmp_path_factory.mktemp("sft_full") / "full"
  return stages.run(sft_test_config(world, steps=6), str(path)), path


def _final(run):
  return checkpoint.load_params(run / "final")[1]


@pytest.mark.slow
def test_sft_stage_learns_and_resumes_exactly(world, full_run, tmp_path):
  full, full_path = full_run
  records = read_metrics(full_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 7))
  assert records[-1]["loss"] < records[0]["loss"] - 0.3
  assert records[-1]["data/documents"] > 0 and full["final"]
  # Stop after 4 steps (a checkpoint every 2), then resume to 6: same params as one run.
  stages.run(sft_test_config(world, steps=4), str(tmp_path / "split"))
  resumed = stages.run(sft_test_config(world, steps=6), str(tmp_path / "split"))
  assert resumed["resumed_from"] == 4
  main_runs.assert_bit_exact(_final(full_path), _final(tmp_path / "split"))
  summary = json.loads((tmp_path / "split" / "summary.json").read_text())
  assert summary["step"] == 6


@pytest.mark.parametrize("damage", ["truncated array file", "deleted array file",
                                    "truncated state metadata", "empty step folder"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(world, full_run, tmp_path,
                                                                 damage):
  """One bad write must not become a crash loop: step 6 is set aside and 4 resumes."""
  _, full_path = full_run
  run = tmp_path / "run"
  shutil.copytree(full_path, run)
  shutil.rmtree(run / "final")  # as if killed after the last checkpoint was (badly) written
  DAMAGE[damage](run / "checkpoints" / "6")
  summary = stages.run(sft_test_config(world, steps=6), str(run))
  assert summary["resumed_from"] == 4 and summary["step"] == 6
  assert (run / checkpoint.SET_ASIDE / "6").is_dir()
  main_runs.assert_bit_exact(_final(full_path), _final(run))


def test_sft_bad_input(world, tmp_path):
  c = sft_test_config(world)
  c.data.train = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    stages.run(c, str(tmp_path / "a"))
  c = sft_test_config(world)
  c.data.seq_len = 4096  # the model's max_position is 256
  with pytest.raises(ValueError, match="max_position"):
    stages.run(c, str(tmp_path / "b"))
  # Malformed rows under max_bad_share (2 of 32) are skipped and counted, not fatal.
  rows = open(world["corpus"]).read().splitlines()
  bad = tmp_path / "bad.jsonl"
  bad.write_text("\n".join(["{oops", '{"text": 3}'] + rows[:30]) + "\n")
  c = sft_test_config(world, steps=20)
  c.data.train, c.data.epochs, c.max_bad_share = str(bad), 1, 0.1
  summary = stages.run(c, str(tmp_path / "c"))
  assert summary["data_exhausted"] and summary["step"] < 20
  assert summary["data/malformed_json"] == 1 and summary["data/bad_type"] == 1
  assert summary["data/documents"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [0, 1])
def test_sft_with_no_usable_rows_fails_fast_and_writes_nothing(world, tmp_path, epochs):
  """A CSV of questions and answers given as SFT data: every row loads, none is a document.
  Neither spinning forever (epochs 0) nor writing untrained weights as final/ (epochs 1): a
  data error (exit 65) within seconds, with the counts and the first bad row."""
  csv = tmp_path / "train.csv"
  csv.write_text("question,answer\n" + "\n".join(f"q{i},{i}" for i in range(40)) + "\n")
  c = sft_test_config(world)
  c.data.train, c.data.epochs = str(csv), epochs
  t0 = time.monotonic()
  proc = main_runs.start(f"--config={main_runs.config_file(c, tmp_path / 'exp.py')}",
                         f"--workdir={tmp_path / 'w'}")
  out, _ = proc.communicate(timeout=120)  # a hang fails here instead of stalling the suite
  assert proc.returncode == DataError.exit_code, out[-3000:]
  assert "1 of 1 rows read are unusable, over max_bad_share 1.0% of its 40 rows" in out
  assert re.search(r"the first is row \d+: missing_field", out), out[-3000:]
  assert time.monotonic() - t0 < 90
  assert not (tmp_path / "w" / "final").exists()


@pytest.mark.slow
def test_a_full_disk_stops_the_run_loudly_and_the_last_good_step_resumes(world, full_run,
                                                                          tmp_path):
  """A save that fails (no space left) must stop the run at the next step boundary with the
  cause, not be noticed saves later; the steps saved before it stay restorable."""
  disk = tmp_path / "disk"
  disk.mkdir()
  # Room for about two of this model's checkpoints (~0.7 MB each), then ENOSPC.
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1800k", "tmpfs", str(disk)], check=True)
  c = sft_test_config(world, steps=6)
  c.ckpt.update(every=1, keep=10)
  try:
    proc = main_runs.start(f"--config={main_runs.config_file(c, tmp_path / 'exp.py')}",
                           f"--workdir={disk / 'run'}")
    out, _ = proc.communicate(timeout=300)
    shutil.copytree(disk / "run", tmp_path / "run", ignore=shutil.ignore_patterns("*tmp*"))
  finally:
    subprocess.run(["umount", str(disk)], check=True)
  assert proc.returncode == SaveFailed.exit_code, out[-3000:]
  assert "saving a checkpoint to" in out and "No space left on device" in out, out[-3000:]
  saved = main_runs.saved_steps(tmp_path / "run")
  assert 1 <= len(saved) < 6 and not (tmp_path / "run" / "final").exists()
  resumed = stages.run(c, str(tmp_path / "run"))  # now with room: from the last good step
  # A step committed as the disk filled may be damaged: then it is set aside, not used.
  assert resumed["resumed_from"] in saved and resumed["step"] == 6
  later = [s for s in saved if s > resumed["resumed_from"]]
  assert all((tmp_path / "run" / checkpoint.SET_ASIDE / str(s)).is_dir() for s in later)
  main_runs.assert_bit_exact(_final(full_run[1]), _final(tmp_path / "run"))


@pytest.mark.slow
def test_a_failed_save_stops_the_run_within_seconds_and_writes_no_final(world, tmp_path):
  """A checkpoint folder that refuses writes: the first save fails, and the run exits 74 at
  once with the cause and the folder (orbax's own threads would hold it for minutes), with
  no final/ and a summary.json that records the failure instead of a finished run."""
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(run / "checkpoints")],
                 check=True)
  c = sft_test_config(world, steps=3)
  c.ckpt.update(every=1)
  try:
    t0 = time.monotonic()
    proc = main_runs.start(f"--config={main_runs.config_file(c, tmp_path / 'exp.py')}",
                           f"--workdir={run}")
    out, _ = proc.communicate(timeout=150)
    took = time.monotonic() - t0
  finally:
    subprocess.run(["umount", str(run / "checkpoints")], check=True)
  assert proc.returncode == SaveFailed.exit_code, out[-3000:]
  assert f"saving a checkpoint to {run / 'checkpoints'} failed" in out, out[-3000:]
  assert "Read-only file system" in out and took < 60, (took, out[-3000:])
  summary = json.loads((run / "summary.json").read_text())
  assert summary["exit_code"] == SaveFailed.exit_code and "SaveFailed" in summary["failed"]
  assert not (run / "final").exists() and "final" not in summary


@pytest.mark.slow
def test_sigterm_while_skipping_bad_rows_exits_within_seconds(world, tmp_path):
  """SIGTERM is polled inside the data loop too, so a long run of bad rows (a pass over these
  takes well over 10 s) does not make the process deaf to it."""
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": 3}\n' * 400_000)
  c = sft_test_config(world)  # data.epochs = 0: passes would repeat
  c.data.train, c.max_bad_share = str(bad), 1.0  # every row bad, and no share stops it
  proc = main_runs.start(f"--config={main_runs.config_file(c, tmp_path / 'exp.py')}",
                         f"--workdir={tmp_path / 'w'}")
  deadline = time.monotonic() + 120
  while "bad_type" not in proc.stdout.readline():  # it is reading the bad rows now
    assert proc.poll() is None and time.monotonic() < deadline
  time.sleep(1.0)
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out = main_runs.finish(proc, timeout=60, returncode=EXIT_PREEMPTED)
  assert time.monotonic() - sent < 10, out[-2000:]
  assert json.loads((tmp_path / "w" / "summary.json").read_text())["preempted"] is True


def test_the_teacher_check_reads_the_data_in_any_format(world, tmp_path):
  """check_teacher reads the first teacher record through the one loader: a JSON array (or
  CSV, parquet) of KD rows is checked like jsonl, not refused as having no teacher."""
  from r1jax.core.tokenizer import tokenizer_fingerprint
  teacher = {"tokenizer": tokenizer_fingerprint(world["tokenizer"]), "vocab_size": 7,
             "top_ids": [[1, 2]], "top_logprobs": [[-0.1, -2.0]]}
  rows = tmp_path / "kd.json"
  rows.write_text(json.dumps([{"prompt_ids": [1], "completion_ids": [2], "teacher": teacher}],
                             indent=2))
  with pytest.raises(ValueError, match="teacher tokenizer .* / vocab 7, student .* / vocab 9"):
    sft_stage.check_teacher(str(rows), world["tokenizer"], 9, 2)
  sft_stage.check_teacher(str(rows), world["tokenizer"], 7, 2)
  with pytest.raises(ValueError, match="stores 2 teacher logprobs per token, fewer than"):
    sft_stage.check_teacher(str(rows), world["tokenizer"], 7, 4)
