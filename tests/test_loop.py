"""TrainLoop: when it checkpoints (steps, wall time, half-way, last step) and what it refuses."""

import jax.numpy as jnp
import ml_collections
import pytest

from r1jax.core.config import ckpt_group
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
