"""One optimizer update for any loss: the step SFT, GRPO and the reward model share.

`UpdateStep(opt, param_shardings)(state, micro, loss_fn, sched)`:
1. Accumulate: a scan over the A micro-batches (leading axis of every `micro` leaf) sums
   loss_fn's value, gradient (in f32) and metric sums. A loss whose denominator is taken over
   the whole mini-batch first therefore gets the exact mini-batch gradient.
2. Apply: the optimizer (global-norm clip, AdamW, schedule; train/state.py) updates the
   params. A non-finite loss, gradient or learning rate leaves the state untouched, step count
   included, and says so in metrics["skipped"]; `TrainLoop` stops a run that skips
   `max_skipped_updates` in a row. The schedule's numbers (`sched`) are an input, not
   constants: stages that differ only in them share a compiled update.
The caller jits it with the state donated (`jit_donated`, which passes `sched`); GRPO scans
it over μ passes × M mini-batches inside one call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from r1jax.core.config import OptConfig
from r1jax.core.sharding import MeshJit
from r1jax.train.state import ScheduleInputs, TrainState, lr_schedule, make_optimizer

# loss_fn(params, micro_batch) -> (loss, {name: sum}); sums named *_min / *_max reduce so.
LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


def _reduce(name: str, v_A: jax.Array) -> jax.Array:
  if name.endswith("_min"):
    return jnp.min(v_A)
  if name.endswith("_max"):
    return jnp.max(v_A)
  return jnp.sum(v_A)


@dataclasses.dataclass(frozen=True)
class UpdateStep:
  """Micro-batch accumulation + one optimizer update, for a loss passed in."""

  opt: OptConfig  # the optimizer; its schedule's numbers come with each call
  param_shardings: Any  # the gradient accumulator is laid out like the params

  def accumulate(self, params: Any, loss_fn: LossFn, micro: Any):
    """(grads, loss, sums): Σ over the leading micro-batch axis of loss_fn's outputs."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, self.param_shardings)

    def body(acc, mb):
      (loss, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
      return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), (loss, sums)

    grads, (loss_A, sums_A) = jax.lax.scan(body, zeros, micro)
    return grads, jnp.sum(loss_A), {k: _reduce(k, v) for k, v in sums_A.items()}

  def apply(self, state: TrainState, grads: Any, loss: jax.Array, sched: ScheduleInputs):
    """One optimizer update, or none at all if the loss, the gradient or the learning rate
    is not finite (finite gradients keep AdamW's moments finite)."""
    grad_norm, lr = optax.tree.norm(grads), lr_schedule(self.opt, sched)(state.step)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
    tx = make_optimizer(self.opt, sched)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    return new, {"grad_norm": grad_norm, "lr": lr, "skipped": (~ok).astype(jnp.int32)}

  def __call__(self, state: TrainState, micro: Any, loss_fn: LossFn, sched: ScheduleInputs):
    """(state, loss, sums, metrics) after one update on the A micro-batches in `micro`."""
    grads, loss, sums = self.accumulate(state.params, loss_fn, micro)
    state, metrics = self.apply(state, grads, loss, sched)
    return state, loss, sums, metrics


def jit_donated(fn: Callable, state_shardings: Any, arg_shardings: tuple,
                metrics_sharding: NamedSharding, sched: ScheduleInputs) -> MeshJit:
  """fn(state, *args, sched) -> (state, metrics), jitted with the state donated and laid out
  in place, on the mesh of `metrics_sharding` (the context mesh of the kernels), and called
  as f(state, *args): `sched` is passed on every call (replicated, like the metrics)."""
  return MeshJit(jax.jit(fn, in_shardings=(state_shardings, *arg_shardings, metrics_sharding),
                         out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,)),
                 metrics_sharding.mesh, bound=(sched,), bound_sharding=metrics_sharding)
