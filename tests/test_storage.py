"""Workdirs on an object store (r1jax/core/storage.py): `gs://` paths through the same API as
local ones. There is no GCS here, so an in-memory filesystem stands in for it under the `gs`
protocol (fsspec's, which etils.epath uses for `gs://` without TensorFlow): every byte goes
through epath's object-store backend, as it would to a bucket. Orbax writes checkpoints with
its own GCS driver (tensorstore), which this stand-in cannot serve: the stages run here are
the ones that save none (generate, eval)."""

import json
import logging
import os

import ml_collections
import pytest
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry

import tiny_world
from r1jax import stages
from r1jax.core import storage
from r1jax.core.config import eval_group, model_group
from r1jax.core.metrics import MetricsWriter, read_metrics
from r1jax.core.tokenizer import load_tokenizer, train_sentencepiece
from r1jax.generation.output import ShardWriter, read_rows
from r1jax.stages.eval import eval_config
from r1jax.stages.generate import generate_config


class FakeBucket(MemoryFileSystem):
  """A bucket in memory: object keys `bucket/dir/name`, as gcsfs names them."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=False, **kwargs):  # epath passes gcsfs's flag
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")


@pytest.fixture(scope="module")
def bucket():
  """`gs://` served from memory for this module's tests (the registry restored after)."""
  with pytest.MonkeyPatch.context() as mp:
    for name in ("gs", "gcs"):
      mp.setitem(fsspec_registry, name, FakeBucket)
    mp.setattr(gpath, "_is_tf_installed", lambda: False)  # never TF's backend: real GCS
    FakeBucket.store.clear()
    FakeBucket.pseudo_dirs = [""]
    yield FakeBucket.store


def _exercise(root) -> dict:
  """The storage helpers' operations under `root`; what each left, by relative name."""
  root = storage.path(root)
  root.mkdir(parents=True, exist_ok=True)
  storage.append(root / "log.txt", "one\n")
  storage.append(root / "log.txt", "two\n", sync=True)
  log = storage.Appender(root / "events.bin", binary=True)
  log.write(b"\x01\x02")
  log.flush()
  log.write(b"\x03")
  log.close()
  storage.append(root / "torn.jsonl", b'{"a": 1}\n{"a": 2')
  storage.truncate(root / "torn.jsonl", 9)
  storage.write_atomic(root / "manifest.json", json.dumps({"run": 1}))
  storage.write_atomic(root / "manifest.json", json.dumps({"run": 2}))
  (root / "7" / "state").mkdir(parents=True, exist_ok=True)
  (root / "7" / "state" / "x.bin").write_bytes(b"12345")
  storage.move(root / "7", root / "aside" / "7")
  with open(storage.local_file(root / "log.txt"), encoding="utf-8") as f:  # a local copy
    local = f.read()
  files = storage.files_under(root)
  return {"files": {str(p.relative_to(root)): p.read_bytes() for p in files},
          "sizes": {str(p.relative_to(root)): storage.size(p) for p in files},
          "local": local, "seven": (root / "7").exists()}


def test_each_helper_leaves_the_same_files_on_a_bucket_as_on_a_disk(bucket, tmp_path):
  """Append (a rewrite on a bucket), a log flushed twice, a torn tail cut, an atomic write
  twice, a folder moved aside and a local copy: the same names, bytes and sizes on both
  sides; the URI keeps its scheme (a pathlib.Path would fold `gs://` to `gs:/`)."""
  remote = storage.path("gs://bucket/helpers")
  assert str(remote / "x") == "gs://bucket/helpers/x" and storage.is_remote(remote)
  assert not storage.is_remote(tmp_path) and not storage.is_remote("runs/gs:/x")
  local, there = _exercise(tmp_path / "helpers"), _exercise(remote)
  assert there == local
  assert local["files"]["log.txt"] == b"one\ntwo\n" and local["local"] == "one\ntwo\n"
  assert local["files"]["events.bin"] == b"\x01\x02\x03"
  assert local["files"]["torn.jsonl"] == b'{"a": 1}\n' and not local["seven"]
  assert sorted(local["files"]) == ["aside/7/state/x.bin", "events.bin", "log.txt",
                                    "manifest.json", "torn.jsonl"]
  assert "bucket/helpers/aside/7/state/x.bin" in bucket  # the objects really are in it
  log = storage.Appender(remote / "metrics.jsonl", upload_every_s=3600)  # a long run's log
  for line in ("1\n", "2\n"):
    log.write(line)
    log.flush()
  assert (remote / "metrics.jsonl").read_text() == "1\n"  # not uploaded again so soon
  log.close()
  assert (remote / "metrics.jsonl").read_text() == "1\n2\n"


def test_local_listings_match_pathlib_where_epath_would_not(tmp_path):
  """A folder whose name holds glob characters still lists (epath's own glob would match
  nothing); the recursive listing skips symlinked folders and non-files, as rglob + is_file
  did; sizes come from os.stat."""
  run = tmp_path / "run[1]"
  (run / "eval" / "step_10").mkdir(parents=True)
  (run / "eval" / "step_2").mkdir()
  (run / "eval" / "report.json").write_text("{}")
  (run / "eval" / "step_2" / "a.json").write_text("[1]")
  (run / "linked").symlink_to(run / "eval", target_is_directory=True)
  (run / "dangling").symlink_to(run / "missing")
  assert [p.name for p in storage.glob(run / "eval", "step_*")] == ["step_10", "step_2"]
  assert storage.glob(run / "absent", "*") == []
  assert [str(p.relative_to(run)) for p in storage.files_under(run)] == [
      "eval/report.json", "eval/step_2/a.json"]
  assert storage.size(run / "eval" / "step_2" / "a.json") == 3


def test_a_tokenizer_trains_to_a_bucket_and_loads_from_it(bucket, tmp_path):
  words = ["plus", "minus", "times", "answer", "first", "then", "check", "total", "apples",
           "boxes", "each", "holds", "there", "are", "so", "we", "get", "left"]
  texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
  here = load_tokenizer(train_sentencepiece(texts, tmp_path / "spm", 320))
  saved = train_sentencepiece(texts, "gs://bucket/tok/spm", 320)
  assert str(saved) == "gs://bucket/tok/spm.model" and "bucket/tok/spm.vocab" in bucket
  there = load_tokenizer(saved)
  text = "12 apples plus 3 boxes, so we check the total"
  assert there.encode(text) == here.encode(text) and there.decode(there.encode(text)) == text


def test_generate_output_recovers_torn_commits_on_a_bucket(bucket):
  """The generate stage's resumable writer on objects: a batch written but not committed is
  cut back, and commits after it append."""
  out = storage.path("gs://bucket/gen")
  w = ShardWriter(out, 0, ["a"])
  w.commit(0, {"a": [{"x": 1}]}, {"counts": {}})
  storage.append(out / "a-h00000.jsonl", '{"x": 2}\n{"x": 3')  # a batch that never committed
  storage.append(out / "progress-h00000.jsonl", '{"batch": 1, "si')  # its commit, torn
  w2 = ShardWriter(out, 0, ["a"])
  assert w2.done == {0} and read_rows(out, "a") == [{"x": 1}]
  w2.commit(1, {"a": [{"x": 2}]}, {"counts": {}})
  assert read_rows(out, "a") == [{"x": 1}, {"x": 2}]
  assert ShardWriter(out, 0, ["a"]).done == {0, 1}


def test_metrics_and_tensorboard_logs_on_a_bucket(bucket):
  """A run's metrics.jsonl and event file on a bucket: every step reads back once the
  writer syncs or closes; a resumed writer starts after a torn last line."""
  run = storage.path("gs://bucket/logged")
  with MetricsWriter(run, tensorboard=True, process_index=0) as w:
    w.write(1, {"loss": 2.0})
    w.write(2, {"loss": 1.5, "eval/acc": 0.25})
    w.sync()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    w.write(3, {"loss": 1.0})
  storage.append(run / "metrics.jsonl", '{"step": 4, "lo')  # a kill mid-line
  with MetricsWriter(run, tensorboard=False, process_index=0) as w:
    w.write(4, {"loss": 0.5})
  assert [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")] == [
      (1, 2.0), (2, 1.5), (3, 1.0), (4, 0.5)]
  events = storage.files_under(run / "tensorboard")
  assert len(events) == 1 and storage.size(events[0]) > 100


@pytest.fixture(scope="module")
def two_runs(bucket, tmp_path_factory):
  """A pipeline of generate (12 prompts, k = 2) and eval on a random tiny model, run in a
  local workdir and in `gs://bucket/run`, then again there (every stage done: skipped)."""
  world = tiny_world.make_world(tmp_path_factory.mktemp("storage_world"))
  g = generate_config()
  g.tokenizer, g.model = world["tokenizer"], model_group(**tiny_world.MODEL)
  g.data.update(prompts=world["rl_train"], template="plain", max_prompt_tokens=32, limit=12)
  g.sampler.update(max_new_tokens=10, temperature=1.0, top_p=1.0)  # test_generate's shapes
  g.k, g.batch_prompts, g.progress = 2, 4, False
  g.rewards.num_workers = 1
  g.filters.update(verifier="", truncated=False)
  e = eval_config()
  e.tokenizer, e.model = world["tokenizer"], model_group(**tiny_world.MODEL)
  e.eval = eval_group(benchmarks=world["held_out"], k=2, max_new_tokens=10, batch_size=8,
                      template="plain", max_prompt_tokens=32)
  c = ml_collections.ConfigDict(dict(stage="pipeline", seed=0, allow_changes="",
                                     order=("generate", "eval"), generate=g, eval=e))
  local = tmp_path_factory.mktemp("storage_local") / "run"
  stages.run(c, str(local))
  remote = stages.run(c, "gs://bucket/run")
  again = stages.run(c, "gs://bucket/run")
  return local, storage.path("gs://bucket/run"), remote, again


def _outputs(root) -> dict:
  """What a reader compares between two runs: rows, eval report, metrics, summaries."""
  root = storage.path(root)
  report = json.loads(next((root / "eval" / "eval").glob("*.json")).read_text())
  return {"samples": read_rows(root / "generate", "samples"),
          "report": {k: report[k] for k in ("summary", "questions")},
          "stats": read_rows(root / "generate", "stats"),
          "done": {n: json.loads((root / n / "done.json").read_text())["stage"]
                   for n in ("generate", "eval")},
          "commits": (root / "generate" / "progress-h00000.jsonl").read_text().count("\n")}


@pytest.mark.slow
def test_generate_and_eval_write_to_a_bucket_what_they_write_to_a_disk(two_runs, caplog):
  """Every output of the two stages on a bucket equals the local run's (rows, stats, the
  eval report, done.json), they are objects there, and a re-run skips both stages."""
  local, remote, first, again = two_runs
  assert _outputs(remote) == _outputs(local)
  assert _outputs(local)["commits"] == 3 and len(_outputs(local)["samples"]) == 12
  names = {str(p.relative_to(remote)) for p in storage.files_under(remote)}
  assert {"config.json", "generate/manifest.json", "generate/summary.json",
          "generate/samples-h00000.jsonl", "eval/eval/report.md"} <= names, sorted(names)
  assert not any(n.endswith(".tmp") for n in names) and not os.path.exists("gs:")
  assert again["generate"] == json.loads(json.dumps(first["generate"], default=str))
  with caplog.at_level(logging.WARNING):
    with stages.WorkdirLock(remote):
      pass
  assert "has no lock" in caplog.text
