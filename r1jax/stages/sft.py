"""The SFT / LM stage: masked next-token training on packed jsonl documents.

Used for every supervised step of the recipe: pretraining the tiny base (`{"text"}` rows),
cold start, rejection-sampling SFT and distillation (`{"prompt", "completion"}` rows, loss on
the completion only; with `distill.top_k`, logit distillation on a teacher's top-k logprobs
stored by the `generate` stage). One step: the grain pipeline packs B rows of T tokens
(documents never attend to each other: per-document positions and segment ids), the batch is
laid out on the mesh, and one jitted, donated `Trainer.sft_step` (the shared update,
train/update.py) applies an AdamW update (skipped, and counted, if the loss or gradient is
not finite). Checkpoints hold the train state and the pipeline's position; the final params
go to WORKDIR/final for the next stage.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from r1jax.core import checkpoint as ckpt_lib
from r1jax.core import multihost, sharding
from r1jax.core.config import model_config, opt_config, opt_group, stage_group
from r1jax.core.storage import Path
from r1jax.core.tokenizer import TEMPLATES, load_tokenizer, tokenizer_fingerprint, tokenizer_path
from r1jax.core.weights import check_vocab, load_model
from r1jax.data import pipeline as data_lib
from r1jax.data import shards as shards_lib
from r1jax.data.rows import read_records
from r1jax.train.batches import SFTBatch
from r1jax.train.loop import TrainLoop
from r1jax.train.trainer import SFTSettings, Trainer


def sft_config(steps: int = 1000) -> ml_collections.ConfigDict:
  """The `sft` stage's config: packed next-token training (pretraining, cold start, RS-SFT)."""
  c = stage_group("sft", steps)
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # jsonl/parquet of {"text"} or {"prompt", "completion"} rows
  c.data.batch = 16  # packed rows per step and data shard
  # data shards, each packed on its own (data/shards.py); 0 = one per process. The global
  # batch is shards × batch rows whatever the process count that reads it
  c.data.shards = 0
  c.data.seq_len = 256  # tokens per packed row
  c.data.template = ""  # chat template for prompt/completion rows ('' = raw concatenation)
  c.data.epochs = 0  # passes over the data (0 = repeat until config.steps)
  c.opt = opt_group(lr=1e-3, warmup_steps=50, weight_decay=0.1)
  c.microbatches = 1  # gradient accumulation steps per update (memory only)
  # Logit distillation from a teacher's `generate` output (output.top_k_logprobs >= top_k):
  # loss = kd_weight·KL(teacher top-k + rest ‖ student) + (1 − kd_weight)·CE. The student must
  # share the teacher's tokenizer (checked before training). top_k = 0: plain SFT on the text.
  c.distill = ml_collections.ConfigDict(dict(top_k=0, kd_weight=0.5))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Type-checks an sft config without running it: what is knowable before earlier stages."""
  opt_config(config.opt)
  model_config(config.model)
  d = config.data
  if d.batch < 1 or d.seq_len < 2 or config.steps < 0 or d.epochs < 0 or d.get("shards", 0) < 0:
    raise ValueError(f"sft: need data.batch >= 1, data.seq_len >= 2, steps >= 0, data.epochs "
                     f">= 0 and data.shards >= 0, got {d.batch}, {d.seq_len}, {config.steps}, "
                     f"{d.epochs}, {d.get('shards', 0)}")
  if d.template and d.template not in TEMPLATES:
    raise ValueError(f"sft: data.template {d.template!r} not in {sorted(TEMPLATES)}")
  kd = config.get("distill") or {"top_k": 0, "kd_weight": 0.5}
  if kd["top_k"] < 0 or not 0 <= kd["kd_weight"] <= 1:
    raise ValueError(f"sft: need distill.top_k >= 0 and 0 <= distill.kd_weight <= 1, got "
                     f"{kd['top_k']}, {kd['kd_weight']}")
  if kd["top_k"] and d.template:
    raise ValueError("sft: distillation trains on the teacher's own token ids, so "
                     "data.template must be '' (the prompt is already rendered)")
  if config.microbatches < 1 or d.batch % config.microbatches:
    raise ValueError(f"sft: data.batch {d.batch} does not split into microbatches="
                     f"{config.microbatches}")


def check_teacher(path: str, tokenizer_file: str, vocab_size: int, top_k: int) -> None:
  """Logit distillation needs the teacher's ids to be the student's: checked on the data's
  first teacher record, before any training (ValueError naming both sides)."""
  first = next((row["teacher"] for _, row in read_records(path)
                if isinstance(row, dict) and isinstance(row.get("teacher"), dict)), None)
  if first is None:
    raise ValueError(f"distill.top_k={top_k} but {path} has no teacher logprobs: write it with "
                     "the generate stage's output.top_k_logprobs >= distill.top_k")
  mine = tokenizer_fingerprint(tokenizer_file)
  if first.get("tokenizer") != mine or first.get("vocab_size") != vocab_size:
    raise ValueError(
        f"the teacher's vocabulary differs from the student's: teacher tokenizer "
        f"{first.get('tokenizer')} / vocab {first.get('vocab_size')}, student {mine} / vocab "
        f"{vocab_size}. Logit distillation needs one tokenizer; distil a student of another "
        "family by plain SFT on the text (distill.top_k = 0)")
  if len(first.get("top_ids", [[]])[0]) < top_k:
    raise ValueError(f"{path} stores {len(first['top_ids'][0])} teacher logprobs per token, "
                     f"fewer than distill.top_k={top_k}")


def _metrics(train: dict, counts: dict, seconds: float, tokens: int) -> dict[str, float]:
  out = {k: float(np.mean(np.asarray(v))) for k, v in train.items()}
  out["skipped"] = float(np.sum(np.asarray(train["skipped"])))
  out["tokens_per_s"] = tokens / max(seconds, 1e-9)
  out.update({f"data/{k}": float(v) for k, v in counts.items()})
  return out


def run(config, workdir: Path) -> dict:
  """Trains config.model on config.data.train for config.steps packed batches."""
  validate(config)
  d = config.data
  mesh = sharding.make_mesh(config.mesh.shape)
  tok = load_tokenizer(tokenizer_path(config))
  kd = config.get("distill") or {"top_k": 0, "kd_weight": 0.5}
  # Bad input (missing file, wrong checkpoint shape) fails here, before any training.
  it = shards_lib.ShardedIterator(lambda index, count: data_lib.SFTPipeline(
      d.train, tok, d.batch, d.seq_len, template=d.template or None, seed=config.seed,
      num_epochs=d.epochs or None, distill_top_k=kd["top_k"],
      max_bad_share=config.max_bad_share, shard_index=index, shard_count=count),
      d.get("shards", 0))
  # Resuming: only shapes are read here; the weights come from the run's own checkpoint.
  resuming = ckpt_lib.has_checkpoint(workdir / "checkpoints")
  cfg, params = load_model(config.model, mesh, seed=config.seed, abstract=resuming)
  check_vocab(tok, cfg)
  if kd["top_k"]:
    check_teacher(d.train, tokenizer_path(config), tok.vocab_size, kd["top_k"])
  if d.seq_len > cfg.max_position:
    raise ValueError(f"data.seq_len {d.seq_len} > the model's max_position {cfg.max_position}")
  trainer = Trainer(cfg, opt_config(config.opt), mesh,
                    sft=SFTSettings(microbatches=config.microbatches, kd_weight=kd["kd_weight"]))
  abstract = (ckpt_lib.abstract_like(jax.eval_shape(trainer.init_state, params),
                                     trainer.state_shardings) if resuming else None)
  with TrainLoop(config, workdir, "sft") as loop:
    start, state, extra = loop.start(abstract, lambda: trainer.init_state(params), resuming)
    if extra:
      it.set_state(extra["data"])
    it.should_stop = lambda: loop.preemption.requested

    def one_step(step: int, state):
      t0 = time.perf_counter()
      packed, why = None, None
      try:
        packed = next(it)
      except StopIteration:  # data.epochs ran out before config.steps
        why = "data_exhausted"
      except data_lib.DataInterrupted:  # SIGTERM while skipping bad rows
        why = "preempted"
      if multihost.any_process(why is not None):  # every process stops at the same step
        loop.summary[why or "preempted"] = True
        return None
      state, train = trainer.sft_step(state, trainer.put_batch(SFTBatch(**packed)))
      jax.block_until_ready(state)
      counts = multihost.sum_over_processes({**it.counts, "_tokens": packed["mask"].sum()})
      tokens = int(counts.pop("_tokens"))  # every process's: tokens_per_s is the run's
      metrics = _metrics(train, counts, time.perf_counter() - t0, tokens)
      return state, metrics, {"data": shards_lib.gather(it.get_state())}

    state, step = loop.run(state, start, one_step)
    stopped_in_data = loop.summary.get("data_exhausted") or loop.summary.get("preempted")
    if stopped_in_data and step > start and loop.ckpt.latest_step() != step:
      loop.ckpt.save(step, state, {"data": shards_lib.gather(it.get_state())}, force=True)
    return loop.complete(state, step, lambda s: {
        "final": str(ckpt_lib.save_params(workdir / "final", s.params, cfg))})
