"""The `reward_model` stage: a Bradley–Terry reward model trained on preference pairs.

R1's all-scenario RL judges helpfulness and safety with such models (rewards/reward_model.py
holds the model, its scoring and its registry hook). One step: B pairs from the shuffled
preference rows (data/preferences.py) are encoded, placed on the mesh once, and one jitted,
donated update (train/update.py, shared with SFT and GRPO) applies −log σ(r_chosen −
r_rejected): micro-batch accumulation, clipping, the non-finite skip and the step count.
The loop is the other stages' `TrainLoop`: resume after a kill, SIGTERM saves and stops,
best-metric checkpoints on the held-out pair accuracy. The trained model goes to
WORKDIR/reward_model, with norm.json: its held-out pairwise accuracy and the mean / std of its
held-out scores (the fixed normalisation a reward spec's `norm: "validation"` reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import checkpoint, sharding
from r1jax.core.config import ModelConfig, OptConfig, opt_config, opt_group, stage_group
from r1jax.core.tokenizer import Tokenizer, load_tokenizer, tokenizer_path
from r1jax.core.weights import check_vocab, load_model
from r1jax.data.preferences import encode_pairs, load_pairs
from r1jax.rewards.model_specs import NORM_FILE
from r1jax.rewards.reward_model import bradley_terry, init_rm, rm_axes, save_rm, score
from r1jax.train import batches as batches_lib
from r1jax.train.batches import PairBatch
from r1jax.train.loop import TrainLoop, refuse_untrained
from r1jax.train.state import TrainState, init_state, lr_schedule, make_optimizer, state_shardings
from r1jax.train.update import UpdateStep, jit_donated


def reward_model_config(steps: int = 2000) -> ml_collections.ConfigDict:
  """The `reward_model` stage's config: preference data, optimizer, eval cadence."""
  c = stage_group("reward_model", steps)
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # preference jsonl: {"prompt", "chosen", "rejected"} per line
  c.data.eval = ""  # held-out preference jsonl ('' = no eval)
  c.data.template = "chatml"  # chat template around the prompt
  c.data.max_len = 1024  # tokens per (prompt + response); the end is kept
  c.data.batch = 32  # preference pairs per step
  c.opt = opt_group(lr=1e-5, warmup_steps=50, grad_clip=1.0)
  c.microbatches = 1  # gradient accumulation steps per update (memory only)
  c.eval_every = 200  # steps between held-out pairwise accuracy checks (and the last step)
  c.ckpt.best_metric = "rm/eval_accuracy"  # keep the best step too (needs data.eval)
  return c


def pair_batch(encoded: dict[str, tuple[np.ndarray, np.ndarray]]) -> PairBatch:
  """`encode_pairs` output as a PairBatch (host arrays)."""
  return PairBatch(*encoded["chosen"], *encoded["rejected"])


class RMTrainer:
  """Sharded init and the jitted, donated Bradley–Terry update for one mesh."""

  def __init__(self, cfg: ModelConfig, opt: OptConfig, mesh: Mesh, microbatches: int = 1):
    self.cfg, self.mesh, self.microbatches = cfg, mesh, int(microbatches)
    self.tx = make_optimizer(opt)
    abstract = jax.eval_shape(lambda: init_rm(cfg, jax.random.key(0)))
    self.param_shardings = sharding.tree_shardings(rm_axes(cfg), abstract, mesh)
    self.state_shardings = state_shardings(self.tx, abstract, self.param_shardings, mesh)
    self.update = UpdateStep(self.tx, lr_schedule(opt), self.param_shardings)
    self.abstract_state = checkpoint.abstract_like(
        jax.eval_shape(lambda: init_state(self.tx, abstract)), self.state_shardings)
    self._init = jax.jit(lambda key, backbone: init_state(self.tx, init_rm(cfg, key, backbone)),
                         out_shardings=self.state_shardings)
    self._score = jax.jit(lambda p, t, m: score(p, t, m, cfg))
    self._steps: dict[Any, Any] = {}

  def init(self, key: jax.Array, backbone: Any = None) -> TrainState:
    """State built straight into its shardings; `backbone` e.g. an SFT policy's params."""
    return self._init(key, backbone)

  def put_batch(self, batch: PairBatch) -> PairBatch:
    """Host pairs → the mesh in one transfer, rows split for the micro-batches."""
    return batches_lib.put_batch(batch, self.microbatches, self.mesh)

  def step(self, state: TrainState, batch: PairBatch) -> tuple[TrainState, dict]:
    """One optimizer update on a placed PairBatch (the state is donated)."""
    batches_lib.check_batch(batch, self.microbatches)
    key = tuple(batch.chosen.shape)
    if key not in self._steps:
      self._steps[key] = jit_donated(
          self._update, self.state_shardings,
          (batches_lib.batch_shardings(batch, self.microbatches, self.mesh),),
          NamedSharding(self.mesh, PartitionSpec()))
    return self._steps[key](state, batch)

  def _update(self, state: TrainState, batch: PairBatch):
    a, pairs = self.microbatches, batch.chosen.shape[0]
    micro = jax.tree.map(lambda x: batches_lib.split_rows(x, 1, a, self.mesh)[0], batch)

    def micro_loss(params, x: PairBatch):
      r_2B = score(params, jnp.concatenate([x.chosen, x.rejected]),
                   jnp.concatenate([x.chosen_mask, x.rejected_mask]), self.cfg)
      b = x.chosen.shape[0]
      mean_loss, _ = bradley_terry(r_2B[:b], r_2B[b:])
      margin_B = r_2B[:b] - r_2B[b:]
      # The micro-batch's share of the whole batch's mean: accumulation is exact.
      return mean_loss * (b / pairs), {"correct": jnp.sum(margin_B > 0),
                                       "margin": jnp.sum(margin_B)}

    state, loss, sums, metrics = self.update(state, micro, micro_loss)
    return state, {**metrics, "rm/loss": loss, "rm/accuracy": sums["correct"] / pairs,
                   "rm/margin": sums["margin"] / pairs}

  def pair_scores(self, params: Any, tokenizer: Tokenizer, rows: Sequence[dict],
                  template: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) f32 scores of preference rows, as the stage encodes them."""
    enc = encode_pairs(tokenizer, rows, template, max_len)
    return (np.asarray(self._score(params, *enc["chosen"])),
            np.asarray(self._score(params, *enc["rejected"])))

  def all_pair_scores(self, params: Any, tokenizer: Tokenizer, rows: Sequence[dict],
                      template: str, max_len: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`pair_scores` of every row, in batches of `batch` (the tail padded: one shape)."""
    chosen, rejected = [], []
    for lo in range(0, len(rows), batch):
      part = list(rows[lo:lo + batch])
      n = len(part)
      rc, rr = self.pair_scores(params, tokenizer, part + [part[0]] * (batch - n), template,
                                max_len)
      chosen.append(rc[:n])
      rejected.append(rr[:n])
    return np.concatenate(chosen), np.concatenate(rejected)


def validation_norm(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
  """The RM's held-out facts, saved beside it as norm.json: the mean / std of its scores on
  every held-out response (the fixed affine a reward spec's `norm: "validation"` applies)
  and its pairwise accuracy."""
  both = np.concatenate([chosen, rejected]).astype(np.float64)
  return {"mean": float(both.mean()), "std": float(both.std() or 1.0),
          "responses": int(both.size), "pair_accuracy": float(np.mean(chosen > rejected))}


def _rows(train: list[dict], order: np.ndarray, step: int, batch: int) -> list[dict]:
  """Step `step`'s pairs: a window of the seeded permutation, so resuming needs no iterator."""
  lo = ((step - 1) * batch) % max(1, len(train) - batch + 1)
  return [train[i] for i in order[lo:lo + batch]]


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Bradley–Terry training on preference jsonl in a TrainLoop, then WORKDIR/reward_model."""
  d, workdir = config.data, Path(workdir)
  # Bad input fails here, before any device work.
  train, held_out = load_pairs(d.train), (load_pairs(d.eval) if d.eval else [])
  tok = load_tokenizer(tokenizer_path(config))
  mesh = sharding.make_mesh(config.mesh.shape)
  resuming = checkpoint.has_checkpoint(workdir / "checkpoints")
  cfg, backbone = load_model(config.model, mesh, seed=config.seed, abstract=resuming)
  check_vocab(tok, cfg)
  trainer = RMTrainer(cfg, opt_config(config.opt), mesh, config.microbatches)
  order = np.random.default_rng(config.seed).permutation(len(train))
  with TrainLoop(config, workdir, "reward_model") as loop:
    start, state = 0, None
    if resuming:
      restored = loop.resume(trainer.abstract_state)
      if not restored:
        raise RuntimeError(f"{workdir}/checkpoints has step folders but none could be restored")
      start, state, _ = restored
    else:
      state = trainer.init(jax.random.key(config.seed), backbone)
    step, scores = start, None  # scores: the held-out (chosen, rejected) at the last eval
    for step in range(start + 1, config.steps + 1):
      enc = encode_pairs(tok, _rows(train, order, step, d.batch), d.template, d.max_len)
      state, m = trainer.step(state, trainer.put_batch(pair_batch(enc)))
      metrics = {k: float(np.asarray(v)) for k, v in m.items()}
      scores = None
      if held_out and (step % config.eval_every == 0 or step == config.steps):
        scores = trainer.all_pair_scores(state.params, tok, held_out, d.template, d.max_len,
                                         d.batch)
        metrics["rm/eval_accuracy"] = float(np.mean(scores[0] > scores[1]))
      if loop.end_step(step, metrics, state, {"pairs_seen": step * d.batch}):
        break
    if loop.completed and step == config.steps:
      refuse_untrained(state, workdir)
      saved = save_rm(workdir / "reward_model", state.params, cfg)
      loop.summary["checkpoint"] = str(saved)
      if held_out:  # every process joins the sharded scoring; process 0 writes
        if scores is None:  # resumed at the last step: no eval ran in this process
          scores = trainer.all_pair_scores(state.params, tok, held_out, d.template, d.max_len,
                                           d.batch)
        facts = validation_norm(*scores)
        facts.update(template=d.template, max_len=int(d.max_len))
        if jax.process_index() == 0:
          (Path(saved) / NORM_FILE).write_text(json.dumps(facts, indent=2))
        loop.summary["eval_pair_accuracy"] = facts["pair_accuracy"]
    summary = loop.finish(step)
  print(json.dumps(summary, default=float), flush=True)
  return summary
