"""The train state every stage updates, the optimizer, and where their arrays live on the mesh.

`TrainState` is a plain pytree (params, optimizer state, step) passed to pure jitted functions.
The optimizer is AdamW after global-norm clipping, with a warmup + constant / cosine schedule.
`state_shardings` lays optimizer moments out exactly like their params and replicates the
rest, so a policy, a reference and a reward model share one layout rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import model
from r1jax.core.config import OptConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything one update changes."""

  params: Any  # sharded by the model's logical axes (model.param_axes, or an RM's rm_axes)
  opt_state: Any  # optax state: param-shaped leaves sharded like params, the rest replicated
  step: jax.Array  # () int32: optimizer updates applied (skipped ones excluded)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScheduleInputs:
  """The learning-rate schedule's numbers, passed to the compiled update instead of written
  into it as constants: stages that differ only in lr, warmup or length then share one
  program (through the persistent compilation cache). Each leaf is the float32 XLA made of
  the constant, divisors as the reciprocals its simplifier multiplies by, so the update is
  bit-for-bit the one compiled with constants (test_train_step.py checks it)."""

  lr: Any  # peak learning rate
  warmup: Any  # warmup steps
  inv_warmup: Any  # 1 / warmup steps (0 without warmup)
  inv_decay: Any  # 1 / (total_steps − warmup_steps): the cosine's length (0 without)
  final: Any  # final_lr_ratio
  half_drop: Any  # (1 − final_lr_ratio) / 2: the cosine's amplitude


def schedule_inputs(o: OptConfig) -> ScheduleInputs:
  """o's schedule numbers as f32 scalars: Python's float64 arithmetic first, as the constants
  had it, and reciprocals in f32 of the f32 divisor, as XLA folds them."""
  f = np.float32
  inv = lambda n: f(1) / f(n) if n > 0 else f(0)
  return ScheduleInputs(f(o.lr), f(o.warmup_steps), inv(o.warmup_steps),
                        inv(o.total_steps - o.warmup_steps), f(o.final_lr_ratio),
                        f((1 - o.final_lr_ratio) * 0.5))


def lr_schedule(o: OptConfig,
                h: ScheduleInputs | None = None) -> Callable[[jax.Array], jax.Array]:
  """lr(step): linear warmup lr·(step+1)/warmup, then constant or cosine to final_lr_ratio·lr.
  The kind of schedule is o's; its numbers are `h` (traced in a compiled update) or o's."""
  h = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), h or schedule_inputs(o))

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    lr = h.lr * (jnp.minimum(1.0, (s + 1) * h.inv_warmup) if o.warmup_steps else 1.0)
    if o.schedule == "cosine":
      frac = jnp.clip((s - h.warmup) * h.inv_decay, 0.0, 1.0)
      lr = lr * (h.final + h.half_drop * (1 + jnp.cos(math.pi * frac)))
    return lr

  return schedule


def _decay_mask(params: Any) -> Any:
  """True on matrices: norms and biases get no weight decay."""
  flat = model.flatten(params)
  return model.unflatten({n: "norm" not in n and "bias" not in n for n in flat})


def make_optimizer(o: OptConfig, h: ScheduleInputs | None = None) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW (decay on matrices only: norms and biases excluded), at
  lr_schedule(o, h). The state's tree is the same whatever `h` holds."""
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
      optax.scale_by_adam(o.b1, o.b2, o.eps),
      optax.add_decayed_weights(o.weight_decay, _decay_mask) if o.weight_decay
      else optax.identity(),
      optax.scale_by_learning_rate(lr_schedule(o, h)))


def _f32(params: Any) -> Any:
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)


def init_state(tx: optax.GradientTransformation, params: Any) -> TrainState:
  """Step 0 of `params` under optimizer `tx` (pure: jit it with the state shardings).

  The moments are f32 whatever the params' dtype: the update's gradients are f32, so moments
  in bf16 would change dtype at the first update (and a μ × M scan could not carry them)."""
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return TrainState(params, tx.init(zeros), jnp.zeros((), jnp.int32))


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                    mesh: Mesh) -> TrainState:
  """TrainState of shardings: moments like their params, counts and the step replicated."""
  rep = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, _f32(abstract_params)),
                              param_shardings, transform_non_params=lambda _: rep)
  return TrainState(param_shardings, opt, rep)
