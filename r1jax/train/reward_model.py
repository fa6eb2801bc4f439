"""The reward model's jitted Bradley–Terry update, and its pair scoring, on one mesh.

The model itself (a policy backbone with a scalar head) and its scoring live in
rewards/reward_model.py. One step: B pairs, placed on the mesh once, and one jitted, donated
update (train/update.py, shared with the policy's steps) on −log σ(r_chosen − r_rejected):
micro-batch accumulation, clipping, the non-finite skip and the step count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import checkpoint, multihost, sharding
from r1jax.core.config import ModelConfig, OptConfig
from r1jax.core.tokenizer import Tokenizer
from r1jax.rewards.reward_model import RewardModel, bradley_terry, init_rm, rm_axes, score
from r1jax.train import batches as batches_lib
from r1jax.train.batches import PairBatch
from r1jax.train.state import (ScheduleInputs, TrainState, init_state, make_optimizer,
                               schedule_inputs, state_shardings)
from r1jax.train.update import UpdateStep, jit_donated


class RMTrainer:
  """Sharded init and the jitted, donated Bradley–Terry update for one mesh."""

  def __init__(self, cfg: ModelConfig, opt: OptConfig, mesh: Mesh, microbatches: int = 1):
    self.cfg, self.mesh, self.microbatches = cfg, mesh, int(microbatches)
    self.tx = make_optimizer(opt)
    abstract = jax.eval_shape(lambda: init_rm(cfg, jax.random.key(0)))
    self.param_shardings = sharding.tree_shardings(rm_axes(cfg), abstract, mesh)
    self.state_shardings = state_shardings(self.tx, abstract, self.param_shardings, mesh)
    self.update = UpdateStep(opt, self.param_shardings)
    self.sched = schedule_inputs(opt)  # an input of the update: RMs of other lengths share it
    self.abstract_state = checkpoint.abstract_like(
        jax.eval_shape(lambda: init_state(self.tx, abstract)), self.state_shardings)
    self._init = jax.jit(lambda key, backbone: init_state(self.tx, init_rm(cfg, key, backbone)),
                         out_shardings=self.state_shardings)
    self._cache: dict[tuple, Callable] = {}

  def init(self, key: jax.Array, backbone: Any = None) -> TrainState:
    """State built straight into its shardings; `backbone` e.g. an SFT policy's params."""
    return self._init(key, backbone)

  def put_batch(self, batch: PairBatch) -> PairBatch:
    """Host pairs → the mesh in one transfer, rows split for the micro-batches."""
    return batches_lib.put_batch(batch, self.microbatches, self.mesh)

  def step(self, state: TrainState, batch: PairBatch) -> tuple[TrainState, dict]:
    """One optimizer update on a placed PairBatch (the state is donated)."""
    batches_lib.check_batch(batch, self.microbatches)
    return self.program(batch)(state, batch)

  def program(self, batch: PairBatch) -> Callable:
    """The jitted update for this batch's shapes (placed or abstract: the AOT tool lowers it)."""
    key = ("step", tuple(batch.chosen.shape))
    if key not in self._cache:
      self._cache[key] = jit_donated(
          self._update, self.state_shardings,
          (batches_lib.batch_shardings(batch, self.microbatches, self.mesh),),
          NamedSharding(self.mesh, PartitionSpec()), self.sched)
    return self._cache[key]

  def _update(self, state: TrainState, batch: PairBatch, sched: ScheduleInputs):
    a, pairs = self.microbatches, batch.chosen.shape[0]
    micro = jax.tree.map(lambda x: batches_lib.split_rows(x, 1, a, self.mesh)[0], batch)

    def micro_loss(params, x: PairBatch):
      # The loss sees only differences of scores, so the head's bias has no gradient but
      # rounding noise, which Adam would scale up to steps of the full learning rate: held.
      head = {**params["head"], "b": jax.lax.stop_gradient(params["head"]["b"])}
      params = {**params, "head": head}
      r_2B = score(params, jnp.concatenate([x.chosen, x.rejected]),
                   jnp.concatenate([x.chosen_mask, x.rejected_mask]), self.cfg)
      b = x.chosen.shape[0]
      mean_loss, _ = bradley_terry(r_2B[:b], r_2B[b:])
      margin_B = r_2B[:b] - r_2B[b:]
      # The micro-batch's share of the whole batch's mean: accumulation is exact.
      return mean_loss * (b / pairs), {"correct": jnp.sum(margin_B > 0),
                                       "margin": jnp.sum(margin_B)}

    state, loss, sums, metrics = self.update(state, micro, micro_loss, sched)
    return state, {**metrics, "rm/loss": loss, "rm/accuracy": sums["correct"] / pairs,
                   "rm/margin": sums["margin"] / pairs}

  def all_pair_scores(self, params: Any, tokenizer: Tokenizer, rows: Sequence[dict],
                      template: str, max_len: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) f32 scores of preference rows, scored as the RL loop's RewardModel
    scores responses (batches of `batch`, the tail padded). In several processes each scores
    its block of every batch (the forward one process would run) and every process gets all
    the scores."""
    rm = RewardModel(params, self.cfg, tokenizer, template=template, max_len=max_len,
                     batch_size=batch, mesh=self.mesh)
    mine = multihost.host_indices(len(rows), batch)
    prompts = [rows[i]["prompt"] for i in mine]
    sides = [rm([rows[i][side] for i in mine], prompts) for side in ("chosen", "rejected")]
    out = np.zeros((2, len(rows)), np.float32)
    for index, scores in multihost.gather_json([mine, sides]):
      out[:, index] = scores
    return out[0], out[1]
