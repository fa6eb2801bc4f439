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
