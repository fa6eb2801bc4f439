"""The `reward_model` stage: a Bradley–Terry reward model trained on preference pairs.

R1's all-scenario RL judges helpfulness and safety with such models (rewards/reward_model.py
holds the model, its scoring and its registry hook). One step: B pairs from the shuffled
preference rows (data/preferences.py) are encoded and handed to the jitted, donated
Bradley–Terry update (train/reward_model.py).
The loop is the other stages' `TrainLoop`: resume after a kill, SIGTERM saves and stops,
best-metric checkpoints on the held-out pair accuracy. In several processes each one feeds
its block of every step's pairs (`multihost.local_rows`), and the held-out scoring splits the
pairs as one process would batch them. The trained model goes to
WORKDIR/reward_model, with norm.json: its held-out pairwise accuracy and the mean / std of its
held-out scores (the fixed normalisation a reward spec's `norm: "validation"` reads).
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

from r1jax.core import checkpoint, errors, multihost, sharding
from r1jax.core.config import opt_config, opt_group, stage_group
from r1jax.core.storage import Path
from r1jax.core.tokenizer import load_tokenizer, tokenizer_path
from r1jax.core.weights import check_vocab, load_model
from r1jax.data.preferences import encode_pairs, load_pairs
from r1jax.rewards.model_specs import NORM_FILE
from r1jax.rewards.reward_model import save_rm
from r1jax.train.batches import PairBatch
from r1jax.train.loop import TrainLoop
from r1jax.train.reward_model import RMTrainer


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
  """Bradley–Terry training on preference pairs in a TrainLoop, then WORKDIR/reward_model."""
  d, workdir = config.data, Path(workdir)
  if d.batch % jax.process_count():
    raise errors.ConfigError(f"reward_model: data.batch={d.batch} pairs do not split over "
                             f"{jax.process_count()} processes; use a multiple of them")
  # Bad input fails here, before any device work.
  train = load_pairs(d.train, config.max_bad_share)
  held_out = load_pairs(d.eval, config.max_bad_share) if d.eval else []
  tok = load_tokenizer(tokenizer_path(config))
  mesh = sharding.make_mesh(config.mesh.shape)
  resuming = checkpoint.has_checkpoint(workdir / "checkpoints")
  cfg, backbone = load_model(config.model, mesh, seed=config.seed, abstract=resuming)
  check_vocab(tok, cfg)
  trainer = RMTrainer(cfg, opt_config(config.opt), mesh, config.microbatches)
  order = np.random.default_rng(config.seed).permutation(len(train))
  with TrainLoop(config, workdir, "reward_model") as loop:
    start, state, _ = loop.start(trainer.abstract_state,
                                 lambda: trainer.init(jax.random.key(config.seed), backbone),
                                 resuming)
    scores = None  # the held-out (chosen, rejected) scores at the last eval

    def one_step(step: int, state):
      nonlocal scores
      mine = _rows(train, order, step, d.batch)[multihost.local_rows(d.batch)]
      enc = encode_pairs(tok, mine, d.template, d.max_len)
      batch = PairBatch(*enc["chosen"], *enc["rejected"])
      state, m = trainer.step(state, trainer.put_batch(batch))
      metrics = {k: float(np.asarray(v)) for k, v in m.items()}
      scores = None
      if held_out and (step % config.eval_every == 0 or step == config.steps):
        scores = trainer.all_pair_scores(state.params, tok, held_out, d.template, d.max_len,
                                         d.batch)
        metrics["rm/eval_accuracy"] = float(np.mean(scores[0] > scores[1]))
      return state, metrics, {"pairs_seen": step * d.batch}

    def save_final(state) -> dict:
      saved = save_rm(workdir / "reward_model", state.params, cfg)
      out = {"checkpoint": str(saved)}
      if held_out:  # every process joins the sharded scoring; process 0 writes
        final = scores or trainer.all_pair_scores(  # resumed at the last step: none yet
            state.params, tok, held_out, d.template, d.max_len, d.batch)
        facts = validation_norm(*final)
        facts.update(template=d.template, max_len=int(d.max_len))
        if jax.process_index() == 0:
          (Path(saved) / NORM_FILE).write_text(json.dumps(facts, indent=2))
        out["eval_pair_accuracy"] = facts["pair_accuracy"]
      return out

    state, step = loop.run(state, start, one_step)
    summary = loop.complete(state, step, save_final)
  print(json.dumps(summary, default=float), flush=True)
  return summary
