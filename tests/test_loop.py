"""TrainLoop: when it checkpoints (steps, wall time, half-way, last step) and what it refuses."""

import json

import jax.numpy as jnp
import ml_collections
import pytest

from r1jax.core.config import ckpt_group
from r1jax.core.errors import NonFiniteError, SaveFailed
from r1jax.train import loop as loop_lib
from r1jax.train.state import TrainState


def config(steps: int, **ckpt) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(steps=steps, log_every=0, tensorboard=False,
                                        ckpt=ckpt_group(async_save=False, keep=50, **ckpt)))


def saved_steps(tmp_path, cfg, clock=None, monkeypatch=None) -> list[int]:
  with loop_lib.TrainLoop(cfg, tmp_path, "test") as loop:
    state = {"w": jnp.zeros(3)}
    for step in range(1, cfg.steps + 1):
      if clock is not None:
        monkeypatch.setattr(loop_lib.time, "monotonic", lambda s=step: clock(s))
      loop.end_step(step, {"loss": 1.0}, state, {})
  return loop.ckpt.manager.all_steps()


def test_step_cadence_and_the_last_step(tmp_path):
  assert saved_steps(tmp_path, config(10, every=4, every_minutes=0)) == [4, 8, 10]


def test_half_way_save_when_the_step_cadence_would_not_save_before_the_end(tmp_path):
  # tiny_zero:quick's RL: 20 steps, every 50. Without the half-way save a kill at step 19
  # would restart from 0.
  assert saved_steps(tmp_path / "a", config(20, every=50, every_minutes=0)) == [10, 20]
  assert saved_steps(tmp_path / "b", config(7, every=0, every_minutes=0)) == [3, 7]


def test_wall_time_cadence(tmp_path, monkeypatch):
  # Each step takes 4 minutes of (fake) wall time: a save every 3 steps at every_minutes=10,
  # counted from the last save of any kind (here the half-way one at step 7).
  clock = lambda step: 240.0 * step
  monkeypatch.setattr(loop_lib.time, "monotonic", lambda: 0.0)
  cfg = config(14, every=100, every_minutes=10)
  assert saved_steps(tmp_path, cfg, clock, monkeypatch) == [3, 6, 7, 10, 13, 14]


def test_progress_line_has_the_step_of_the_total_and_an_eta(tmp_path, monkeypatch, capsys):
  """The ETA is the pace since the run's first step (which compiles): a first step of 100 s
  and then 2 s a step leaves 14 s at step 3 of 10."""
  now = [0.0]
  cfg = config(10, every=0, every_minutes=0)
  cfg.log_every = 1
  with loop_lib.TrainLoop(cfg, tmp_path, "t") as loop:
    monkeypatch.setattr(loop_lib.time, "monotonic", lambda: now[0])

    def one(step, carry):
      if step > 3:
        return None
      now[0] = 98.0 + 2.0 * step
      return carry, {"loss": 1.0}, {}
    loop.run({"w": jnp.zeros(3)}, 0, one)
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[t] ")]
  assert lines == ["[t] step 1/10 | loss 1", "[t] step 2/10 | loss 1 | ETA 16s",
                   "[t] step 3/10 | loss 1 | ETA 14s"]


def test_the_summary_reports_each_held_out_curves_worst_drop(tmp_path):
  with loop_lib.TrainLoop(config(3, every=0, every_minutes=0), tmp_path, "t") as loop:
    for step, v in ((1, 0.5), (2, 0.25), (3, 0.75)):
      loop.end_step(step, {"eval/held_out/pass@1": v}, {"w": jnp.zeros(3)}, {})
    summary = loop.finish(3)
  assert summary["eval_worst_drop"]["eval/held_out/pass@1"] == {
      "drop": 0.25, "peak_step": 1, "trough_step": 2, "best": 0.75, "best_step": 3, "final": 0.75}
  assert json.loads((tmp_path / "summary.json").read_text())["eval_worst_drop"] == \
      summary["eval_worst_drop"]


def test_final_weights_are_refused_without_an_update(tmp_path):
  untrained = TrainState({"w": jnp.zeros(2)}, (), jnp.zeros((), jnp.int32))
  with pytest.raises(RuntimeError, match="no optimizer update was applied"):
    loop_lib.refuse_untrained(untrained, tmp_path)
  loop_lib.refuse_untrained(TrainState({"w": jnp.zeros(2)}, (), jnp.ones((), jnp.int32)),
                            tmp_path)


def _state(step: int) -> TrainState:
  return TrainState({"w": jnp.zeros(3)}, (), jnp.asarray(step, jnp.int32))


def test_skeleton_runs_until_the_data_ends_and_saves_the_final_output_once(tmp_path):
  """start → run → complete: a step function that returns None ends the run at the step
  before; a run that reached the end of its data writes its final output, a preempted one
  or an untrained one does not."""
  finals = []
  with loop_lib.TrainLoop(config(10, every=0, every_minutes=0), tmp_path / "a", "t") as loop:
    start, state, extra = loop.start(None, lambda: _state(0), resuming=False)
    assert (start, extra) == (0, {})

    def one(step, state):
      if step == 4:
        loop.summary["data_exhausted"] = True
        return None
      return _state(step), {"loss": 1.0}, {}

    state, step = loop.run(state, start, one)
    summary = loop.complete(state, step, lambda s: finals.append(int(s.step)) or {"final": "x"})
  assert step == 3 and finals == [3] and summary["final"] == "x" and summary["step"] == 3
  with loop_lib.TrainLoop(config(5, every=0, every_minutes=0), tmp_path / "b", "t") as loop:
    loop.summary["preempted"] = True
    summary = loop.complete(_state(2), 2, lambda s: finals.append(-1) or {})
  assert finals == [3] and "final" not in summary
  with loop_lib.TrainLoop(config(5, every=0, every_minutes=0), tmp_path / "c", "t") as loop:
    with pytest.raises(RuntimeError, match="no optimizer update was applied"):
      loop.complete(_state(0), 5, lambda s: finals.append(-2) or {})
  assert finals == [3]


def test_skeleton_resuming_without_a_restorable_step_stops(tmp_path):
  with loop_lib.TrainLoop(config(5, every=0, every_minutes=0), tmp_path, "t") as loop:
    with pytest.raises(RuntimeError, match="has step folders but none could be restored"):
      loop.start({"w": jnp.zeros(3)}, lambda: pytest.fail("fresh state built"), resuming=True)


def _train_state(value: float, step: int) -> TrainState:
  return TrainState({"w": jnp.full(3, value)}, (), jnp.asarray(step, jnp.int32))


def test_non_finite_updates_in_a_row_stop_the_run_and_the_summary_says_so(tmp_path):
  """max_skipped_updates non-finite updates in a row (a NaN learning rate skips every one)
  end the run with NonFiniteError (exit 69); a step that applied its update resets the
  count. summary.json records the failure, with no final output."""
  cfg = config(10, every=0, every_minutes=0)
  cfg.max_skipped_updates = 3
  with pytest.raises(NonFiniteError, match="3 updates in a row skipped as non-finite"):
    with loop_lib.TrainLoop(cfg, tmp_path, "t") as loop:
      for step, skipped in enumerate([1, 1, 0, 2, 0, 1, 1, 1, 1], start=1):
        loop.end_step(step, {"loss": 1.0, "skipped": float(skipped)}, _train_state(1, 1), {})
  assert step == 8  # 2 (reset by step 3's update), 2 (reset), then 1 + 1 + 1
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["exit_code"] == 69 and "NonFiniteError" in summary["failed"]
  assert summary["step"] == 8 and "final" not in summary


def test_final_output_is_never_written_from_non_finite_weights(tmp_path):
  written = []
  with pytest.raises(NonFiniteError, match="final weights hold NaN/inf; final/ not written"):
    with loop_lib.TrainLoop(config(2, every=0, every_minutes=0), tmp_path, "t") as loop:
      loop.complete(_train_state(float("nan"), 2), 2, lambda s: written.append(s) or {})
  assert not written
  assert json.loads((tmp_path / "summary.json").read_text())["exit_code"] == 69


def test_a_failed_last_save_writes_no_final_output_and_no_finished_summary(tmp_path):
  """The last step's checkpoint failing (asynchronously, after the loop ended) stops the run
  before the final output: no final/, and summary.json records the failure (exit 74)."""
  written = []
  with pytest.raises(SaveFailed, match="saving a checkpoint to .* failed: OSError: disk gone"):
    with loop_lib.TrainLoop(config(2, every=1, every_minutes=0), tmp_path, "t") as loop:
      state = _train_state(1.0, 1)
      state, step = loop.run(state, 0, lambda step, s: (_train_state(1.0, step), {}, {}))

      def failed():
        raise OSError("disk gone")
      loop.ckpt.manager.check_for_errors = failed  # the last save's writer thread failed
      loop.complete(state, step, lambda s: written.append(s) or {"final": "x"})
  assert not written
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["exit_code"] == 74 and "final" not in summary and summary["step"] == 2
