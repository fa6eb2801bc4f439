"""Multi-process helpers (r1jax/core/multihost.py, data shards, the exit on a lost peer)
checked in this one process, with `jax.process_count` / `process_index` faked; the runs of
2 real processes are tests/test_multihost.py."""

import jax
import numpy as np
import pytest


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
  real entries all process 0's; a batch that does not split is refused, and so are reward
  models on devices of their own."""
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
  check_processes("generate", own)


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


def test_a_reward_model_batch_the_processes_cannot_split_is_refused_first(monkeypatch,
                                                                          tmp_path):
  """2 processes and 3 pairs a step: a ConfigError naming both, before any data is read
  (the data path given does not exist)."""
  from r1jax.core import errors
  from r1jax.stages import reward_model
  c = reward_model.reward_model_config(steps=2)
  c.data.update(train=str(tmp_path / "missing.jsonl"), batch=3)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(errors.ConfigError, match="data.batch=3 pairs do not split over 2"):
    reward_model.run(c, tmp_path / "run")


def test_an_overlap_the_processes_cannot_order_runs_as_rewards_or_is_refused(monkeypatch,
                                                                            caplog):
  """In 2 processes grpo.overlap="rollout" runs as "rewards", logged; an overlap with
  dynamic_sampling is refused; in 1 process, and without an overlap, nothing changes."""
  from r1jax.core import errors
  from r1jax.core.config import GRPOConfig
  from r1jax.stages.rl import processes_overlap
  rollout, rewards, off = (GRPOConfig(overlap=o) for o in ("rollout", "rewards", ""))
  assert processes_overlap(rollout, True) == rollout  # 1 process: as configured
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with caplog.at_level("WARNING"):
    assert processes_overlap(rollout, False) == rewards
  assert "grpo.overlap='rollout' runs as 'rewards' in 2 processes" in caplog.text
  assert processes_overlap(rewards, False) == rewards
  assert processes_overlap(off, True) == off
  for grpo in (rollout, rewards):
    with pytest.raises(errors.ConfigError, match="overlap with dynamic_sampling"):
      processes_overlap(grpo, True)


def test_reward_models_score_before_the_update_in_several_processes(monkeypatch):
  """grpo.overlap="rewards": the update waits for the next samples; in 2 processes with
  reward models (device programs with collectives) for their scores too, so that every
  process dispatches them in one order. Host rewards alone still overlap the update."""
  import contextlib
  import threading
  import time
  import types
  import ml_collections
  from r1jax.core.background import in_thread
  from r1jax.core.config import GRPOConfig
  from r1jax.stages.rl import before_update

  def waited(process_count, models, overlap="rewards"):
    monkeypatch.setattr(jax, "process_count", lambda: process_count)
    sampled, scored = threading.Event(), threading.Event()
    nxt = types.SimpleNamespace(sampled=sampled, pending=in_thread("t", scored.wait))
    rl = types.SimpleNamespace(
        grpo=GRPOConfig(overlap=overlap), loop=types.SimpleNamespace(
            timer=lambda name: contextlib.nullcontext()),
        config=ml_collections.ConfigDict({"rewards": {"models": models}}))
    sampled.set()
    threading.Timer(0.3, scored.set).start()  # scoring ends 0.3 s after sampling
    t0 = time.perf_counter()
    before_update(rl, nxt)
    seconds = time.perf_counter() - t0
    scored.wait()
    return seconds

  rm = [{"name": "judge", "path": "unused"}]
  assert waited(2, rm) >= 0.25
  assert waited(1, rm) < 0.2 and waited(2, []) < 0.2 and waited(2, rm, "") < 0.2
