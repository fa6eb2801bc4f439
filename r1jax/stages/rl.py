"""The `rl` stage: GRPO from rule (and model) rewards, as in R1-Zero and R1's RL stages.

One iteration (`iteration`), in the order the data flows:
1. Prompts: the grain pipeline (data/pipeline.py) yields B problems (checkpointable).
2. Rollout: the engine (generation/engine.py) samples G completions per prompt on the mesh;
   the reference's logprobs are dispatched on those device arrays at once (β > 0), then
   the samples come to the host in one transfer and are detokenised.
3. Rewards (host): the scorer (rewards/compose.py) grades the texts in its process pool
   while the device runs the reference forward.
4. Advantages and DAPO selection (train/advantages.py), host numpy: group-normalised
   advantages; with dynamic sampling, groups whose rewards are all equal are dropped and
   refilled from further prompts (bounded), the rest masked.
5. Update: one host RolloutBatch (train/batches.py) is packed into rows (train/packing.py),
   placed on the mesh once and consumed by one jitted, donated `Trainer.rl_step`
   (train/trainer.py → train/update.py). The reference's log-probs come from 2 or from the
   update, as decided once at setup (train/logprobs.py).
6. Bookkeeping: metrics to JSONL / TensorBoard / console, held-out evals
   (evaluation/suite.py), orbax checkpoints and SIGTERM handling (train/loop.py).
grpo.overlap runs the next iteration's 2–3 in a thread during 5 (stages/rl_ahead.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax.core import checkpoint, errors, multihost, sharding
from r1jax.core import metrics as metrics_lib
from r1jax.core.config import (GRPOConfig, ModelConfig, eval_group, grpo_config, grpo_group,
                               model_config, opt_config, opt_group, stage_group)
from r1jax.core.storage import Path
from r1jax.core.tokenizer import TEMPLATES, Tokenizer, load_tokenizer, tokenizer_path
from r1jax.core.weights import check_vocab, load_model
from r1jax.data.pipeline import PromptIterator, PromptPipeline, check_mixture
from r1jax.data.rows import ADAPTERS
from r1jax.evaluation import suite as suite_lib
from r1jax.generation.engine import Engine, Samples
from r1jax.generation.sampler import STOP_REASONS, SamplingParams
from r1jax.rewards.compose import RewardBatch, RewardScorer, parse_spec, reward_inputs
from r1jax.rewards.reward_model import check_processes, load_models
from r1jax.stages import rl_ahead
from r1jax.train import advantages as adv_lib
from r1jax.train import batches as batches_lib
from r1jax.train.logprobs import LogProbs, RefSource, ref_source
from r1jax.train.loop import TrainLoop
from r1jax.train.state import TrainState
from r1jax.train.trainer import Trainer

log = logging.getLogger(__name__)

# The R1-Zero template's closing tag, bare and after a space: how real-size
# (byte-level BPE) tokenizers encode it in the two usual contexts.
ANSWER_STOPS = ("</answer>", " </answer>")


def rl_config(steps: int = 200) -> ml_collections.ConfigDict:
  """The `rl` stage's config: GRPO from rule rewards (R1-Zero and R1's reasoning RL)."""
  c = stage_group("rl", steps)
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # jsonl/parquet problems (GSM8K, MATH, AIME/AMC or generic rows)
  c.data.adapter = "auto"  # row format: auto | gsm8k | math | generic | code
  c.data.batch = 32  # prompts per RL iteration (per host); each gets grpo.group_size samples
  c.data.template = "r1_zero"  # prompt template
  c.data.max_prompt_tokens = 512  # longer prompts are skipped and counted
  c.data.task_weights = ml_collections.ConfigDict()  # the file's task mix, e.g. math=0.7 (checked)
  c.sampler = ml_collections.ConfigDict()
  c.sampler.max_new_tokens = 1024  # completion budget T
  c.sampler.top_p = 1.0  # rollouts sample the full distribution (R1-Zero: temperature 1)
  c.sampler.top_k = 0  # 0 = off
  c.sampler.stop = ("</answer>",)  # strings that end a completion (one or more tokens each)
  # The decode layout: (data, fsdp, tensor) over the training mesh's chips, e.g. (4, 1, 4) for
  # tensor-parallel groups of 4 on 16 chips; () = decode on the training mesh.
  c.sampler.mesh = ()
  c.grpo = grpo_group()
  c.opt = opt_group()
  c.rewards = ml_collections.ConfigDict(dict(
      task_field="task", default_task="math", timeout_s=10.0, fallback=0.0, num_workers=2,
      worker_memory_mb=4096,
      components=[{"name": "accuracy", "weight": 1.0, "tasks": ["math"],
                   "fields": {"gold": "gold"}},
                  {"name": "format", "weight": 1.0}]))  # see r1jax/rewards/compose.py
  c.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal and refill
  c.max_refill = 2  # extra rollouts per iteration to refill dropped groups (then mask them)
  c.eval = eval_group()
  return c


# ------------------------------------------------------------------------------ typed run


@dataclasses.dataclass(frozen=True)
class RLRun:
  """What one RL run holds fixed, from setup to the last iteration."""

  config: ml_collections.ConfigDict
  workdir: Path
  grpo: GRPOConfig
  cfg: ModelConfig
  tokenizer: Tokenizer
  trainer: Trainer
  logp: LogProbs  # the reference: its copy, reset and log-probs beside a rollout
  ref_source: RefSource  # where the reference's log-probs come from (train/logprobs.py)
  engine: Engine  # rollouts: grpo.temperature, config.sampler's budget, top-p/k and stops
  data: PromptIterator
  evals: suite_lib.EvalSuite
  loop: TrainLoop  # checkpoints, metrics writer, SIGTERM flag, step timer
  scorer: RewardScorer
  resuming: bool  # a committed checkpoint exists: weights come from it, not from config.model


@dataclasses.dataclass(frozen=True)
class ScoredRollout:
  """B prompts' G samples each, graded on the host: one rollout of an iteration."""

  problems: list[dict]  # (B,) pipeline items
  samples: Samples  # (N = B·G) texts, tokens, logprobs, lengths, stop reasons (host)
  rewards: RewardBatch  # total_N and per-component rewards
  ref_logp: np.ndarray | None  # (N, T) f32 reference logprobs; None when β = 0
  advantages: np.ndarray  # (N,) f32 group-normalised
  keep: np.ndarray  # (B,) bool: groups eligible for the update (informative, under DAPO)

  @property
  def row_ok(self) -> np.ndarray:
    """(N,) bool: no reward model failed on the sample (a failed one is kept out of the loss)."""
    if self.rewards is None:
      return np.ones(len(self.samples.texts), bool)
    return ~adv_lib.failed_rows(self.rewards)


@dataclasses.dataclass(frozen=True)
class UpdateBatch:
  """The groups one update trains on, assembled on the host from an iteration's rollouts."""

  batch: batches_lib.RolloutBatch  # B groups of host arrays, placed on the mesh once
  texts: list[str]  # (N,) completions in batch order
  live: int  # leading groups with a learning signal; the rest are masked filler


def validate(config: ml_collections.ConfigDict) -> None:
  """Type-checks an rl config without running it: what is knowable before earlier stages."""
  grpo = grpo_config(config.grpo)
  opt_config(config.opt)
  model_config(config.model)
  parse_spec(config.rewards)  # reward names, weights, tasks, fields
  if grpo.reward_norm == "per_component" and config.rewards.get("by_task"):
    raise ValueError("rl: grpo.reward_norm='per_component' weighs each component once for "
                     "the whole batch; with rewards.by_task (weights per task) use 'sum'")
  s = config.sampler
  SamplingParams(temperature=grpo.temperature, top_p=s.top_p, top_k=s.top_k,
                 max_new_tokens=s.max_new_tokens)
  for where, template in (("data", config.data.template), ("eval", config.eval.template)):
    if template not in TEMPLATES:
      raise ValueError(f"rl: {where}.template {template!r} not in {sorted(TEMPLATES)}")
  if config.data.adapter != "auto" and config.data.adapter not in ADAPTERS:
    raise ValueError(f"rl: data.adapter {config.data.adapter!r} not in "
                     f"{['auto', *sorted(ADAPTERS)]}")
  longest = config.data.max_prompt_tokens + s.max_new_tokens
  if grpo.pack and grpo.pack_len and grpo.pack_len < longest:
    raise ValueError(f"rl: grpo.pack_len={grpo.pack_len} is shorter than the longest sample, "
                     f"data.max_prompt_tokens + sampler.max_new_tokens = {longest}")
  rows, splits = config.data.batch * grpo.group_size, grpo.minibatches * grpo.microbatches
  if config.data.batch < 1 or rows % splits:
    raise ValueError(f"rl: data.batch × grpo.group_size = {rows} rows do not split into "
                     f"grpo.minibatches × grpo.microbatches = {splits}")


def processes_overlap(grpo: GRPOConfig, dynamic_sampling: bool) -> GRPOConfig:
  """grpo.overlap as this process count can run it. In several processes every process must
  dispatch its device programs (and their collectives) in one order, so the sampler may not
  run during the update: "rollout" runs as "rewards" (the same samples, params and metrics:
  only the sampling's timing differs; logged), and an overlap with dynamic_sampling (its
  refill samples during the update) is refused."""
  if jax.process_count() == 1 or not grpo.overlap:
    return grpo
  if dynamic_sampling:
    raise errors.ConfigError(
        "rl: in several processes grpo.overlap with dynamic_sampling (its refill samples "
        "during the update) would interleave the sampler's collectives with the update's in "
        "a different order on each process; use grpo.overlap='' or no dynamic_sampling")
  if grpo.overlap == "rollout":
    log.warning("rl: grpo.overlap='rollout' runs as 'rewards' in %d processes: the next "
                "rollout is sampled before each update and scored during it (the same "
                "samples and updates)", jax.process_count())
    return dataclasses.replace(grpo, overlap="rewards")
  return grpo


def setup(config: ml_collections.ConfigDict, workdir: Path) -> RLRun:
  """Everything one run holds fixed. Bad input fails here, before any device work."""
  validate(config)
  check_processes("rl", config)
  grpo = processes_overlap(grpo_config(config.grpo), bool(config.dynamic_sampling))
  mesh, rm_mesh = sharding.policy_and_reward_meshes(config.mesh.shape,
                                                    config.mesh.get("reward_devices", 0))
  tok = load_tokenizer(tokenizer_path(config))
  pipeline = PromptPipeline(
      config.data.train, tok, config.data.batch, template=config.data.template,
      max_prompt_tokens=config.data.max_prompt_tokens, seed=config.seed,
      adapter=config.data.adapter, max_bad_share=config.max_bad_share)
  # Reward models the spec declares: loaded once, on their own devices or the policy's mesh.
  scorer = RewardScorer(config.rewards,  # a bad reward spec fails here
                        models=load_models(config.rewards.get("models"), rm_mesh))
  tasks = [it["task"] for it in pipeline.items]
  scorer.check_tasks(tasks, config.data.train)  # a task no reward judges: before any work
  weights = config.data.get("task_weights")
  check_mixture(tasks, weights.to_dict() if weights else {}, config.data.train)
  sets = suite_lib.load_sets(config.eval, config.max_bad_share)
  # Only shapes here: the weights come from the run's checkpoint, or from `initial_state`.
  cfg, _ = load_model(config.model, mesh, seed=config.seed, abstract=True)
  check_vocab(tok, cfg)
  if config.data.max_prompt_tokens + config.sampler.max_new_tokens > cfg.max_position:
    raise ValueError(f"data/sampler: max_prompt_tokens {config.data.max_prompt_tokens} + "
                     f"max_new_tokens {config.sampler.max_new_tokens} exceeds the model's "
                     f"max_position {cfg.max_position}")
  s = config.sampler
  decode_mesh = sharding.regroup(mesh, s.mesh) if s.get("mesh") else mesh
  evals = suite_lib.make_suite(config.eval, cfg, decode_mesh, tok, sets)
  engine = Engine(cfg, decode_mesh, tok, temperature=grpo.temperature, top_p=s.top_p,
                  top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                  max_prompt_len=config.data.max_prompt_tokens, stop=tuple(s.stop))
  trainer = Trainer(cfg, opt_config(config.opt), mesh, grpo)
  resuming = checkpoint.has_checkpoint(Path(workdir) / "checkpoints")
  return RLRun(config=config, workdir=Path(workdir), grpo=grpo, cfg=cfg, tokenizer=tok,
               trainer=trainer, logp=LogProbs(cfg, grpo, mesh), ref_source=ref_source(grpo),
               engine=engine, data=iter(pipeline), evals=evals,
               scorer=scorer,
               loop=TrainLoop(config, workdir, "rl"), resuming=resuming)


def _tree(state: TrainState, ref: Any, behaviour: Any = None) -> dict:
  """A checkpoint: the train state, any reference, the pending rollout's params (overlap)."""
  return {"train": state, **({"ref": ref} if ref is not None else {}),
          **({"behaviour": behaviour} if behaviour is not None else {})}


def initial_state(rl: RLRun) -> tuple[int, TrainState, Any, Any]:
  """(start step, state, reference, behaviour): restored straight into their shardings, or
  fresh. `behaviour` (grpo.overlap, resuming): the params of the rollout to replay."""
  c, t = rl.config, rl.trainer
  has_ref = rl.ref_source is not RefSource.NONE
  abstract = None
  if rl.resuming:  # Restore targets only: nothing is allocated twice.
    params = checkpoint.abstract_params(rl.cfg, t.mesh)
    abstract = _tree(
        checkpoint.abstract_like(jax.eval_shape(t.init_state, params), t.state_shardings),
        checkpoint.abstract_like(params, t.param_shardings, jnp.dtype(rl.grpo.ref_dtype))
        if has_ref else None,
        checkpoint.abstract_like(params, t.param_shardings) if rl.grpo.overlap else None)

  def fresh() -> dict:
    state = t.init_state(load_model(c.model, t.mesh, seed=c.seed)[1])
    return _tree(state, rl.logp.make_ref(state.params) if has_ref else None)

  start, tree, extra = rl.loop.start(abstract, fresh, rl.resuming)
  if extra:
    rl.data.set_state(extra["data"])
    rl.loop.summary["rl_wall_s"] = extra.get("rl_wall_s", 0.0)
  return start, tree["train"], tree.get("ref"), tree.get("behaviour")


# ------------------------------------------------------------------------------ iteration


def roll_out(rl: RLRun, params: Any, ref: Any, problems: list[dict], key: jax.Array,
             timer: metrics_lib.StepTimer | None = None,
             sampled: threading.Event | None = None) -> ScoredRollout:
  """Sample, dispatch the reference forward, score on the host: one batch of B groups.
  `sampled` is set once the samples are on the host (grpo.overlap="rewards" waits on it)."""
  g, timer = rl.grpo.group_size, timer or rl.loop.timer
  with timer("rollout"):
    rollout = rl.engine.launch(params, [p["prompt_ids"] for p in problems], key, g)
    samples = rl.engine.collect(rollout, g)
    # Dispatched asynchronously, on packed rows: the device works on it while the host scores.
    ref_logp = None if ref is None else rl.logp.of_batch(
        ref, batches_lib.rollout_batch(samples, np.zeros(len(samples.texts), np.float32)))
  if sampled is not None:
    sampled.set()
  with timer("reward"):
    rewards = rl.scorer.score(reward_inputs(problems, samples.texts, samples.lengths, g))
  with timer("rollout"):
    ref_logp = None if ref_logp is None else ref_logp.get()
  return ScoredRollout(
      problems, samples, rewards, ref_logp,
      adv_lib.rollout_advantages(rewards, rl.grpo, rl.scorer.components),
      adv_lib.keep_groups(rewards, rl.grpo, rl.config.dynamic_sampling, len(problems)))


def collect(rl: RLRun, params: Any, ref: Any, step_key: jax.Array,
            timer: metrics_lib.StepTimer | None = None,
            sampled: threading.Event | None = None) -> list[ScoredRollout]:
  """Rollouts for one update: one, or (DAPO) more until B informative groups or the bound."""
  b, parts, informative = rl.config.data.batch, [], 0
  while True:
    parts.append(roll_out(rl, params, ref, next(rl.data),  # this host's block of prompts
                          jax.random.fold_in(step_key, len(parts)), timer, sampled))
    informative += int(multihost.sum_over_processes({"n": parts[-1].keep.sum()})["n"])
    if informative >= b * jax.process_count() or len(parts) > rl.config.max_refill:
      return parts


def assemble(rl: RLRun, parts: list[ScoredRollout]) -> UpdateBatch:
  """One host RolloutBatch of B groups: informative groups first, then masked filler.

  The row count never changes, so the update compiles once per prompt width; filler groups
  have no loss tokens. Rollouts may have different prompt buckets: all are padded to the
  widest.
  """
  g = rl.grpo.group_size
  full = [batches_lib.rollout_batch(p.samples, p.advantages, p.ref_logp) for p in parts]
  full = [dataclasses.replace(f, completion_mask=f.completion_mask & p.row_ok[:, None])
          for f, p in zip(full, parts)]
  chosen, live = adv_lib.select_groups([p.keep for p in parts], rl.config.data.batch)
  if len(parts) == 1 and live == len(parts[0].keep):  # every group, in order
    return UpdateBatch(full[0], list(parts[0].samples.texts), live)
  pieces, texts = [], []
  for n, (pi, gi) in enumerate(chosen):
    rows = np.arange(gi * g, (gi + 1) * g)
    sub = batches_lib.select_rows(full[pi], rows)
    pieces.append(dataclasses.replace(sub, completion_mask=sub.completion_mask & (n < live)))
    texts += [parts[pi].samples.texts[r] for r in rows]
  return UpdateBatch(batches_lib.concat(pieces), texts, live)


def step_metrics(rl: RLRun, parts: list[ScoredRollout], update: UpdateBatch,
                 train_metrics: dict) -> dict[str, float]:
  """The iteration's log line: rewards, update stats, lengths, stops, selection, timing."""
  first = parts[0]
  out = dict(first.rewards.metrics())
  # Per-update values (μ·M of them) averaged; updates skipped as non-finite summed.
  out.update({k: float(np.mean(np.asarray(v))) for k, v in train_metrics.items()})
  out["skipped"] = float(np.sum(np.asarray(train_metrics["skipped"])))
  if "reward/accuracy" in out:
    out["accuracy"] = out["reward/accuracy"]
  lengths = first.samples.lengths
  out.update(metrics_lib.response_stats(lengths))
  out.update(metrics_lib.reflection_counts(update.texts[:update.live * rl.grpo.group_size]))
  for code, name in enumerate(STOP_REASONS):
    out[f"stop/{name}"] = float(np.mean(first.samples.stop_reason == code))
  out["reward/masked_samples"] = float(sum((~p.row_ok).sum() for p in parts))
  out["dynamic/informative_groups"] = float(update.live)
  out["dynamic/rollouts"] = float(len(parts))
  out.update({f"data/skipped_{k}": float(v) for k, v in dict(rl.data.pipeline.skipped).items()})
  out.update(rl.loop.timer.metrics())
  step_s = sum(v for k, v in out.items() if k.startswith("time/"))
  out["tokens_per_s"] = float(lengths.sum() * len(parts) / max(step_s, 1e-9))
  return out


def _step_key(rl: RLRun, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(rl.config.seed), step)


def _start_ahead(rl: RLRun, params: Any, step: int, copy: bool = True) -> rl_ahead.Ahead:
  """Step `step`'s rollout in the background, on `params` (its reference logprobs are left
  to the update: the reference may be reset before then)."""
  return rl_ahead.start(
      lambda p, timer, sampled: collect(rl, p, None, _step_key(rl, step), timer, sampled),
      params, rl.data, copy)


def iteration(rl: RLRun, state: TrainState, ref: Any, step: int,
              ahead: rl_ahead.Ahead | None = None):
  """One GRPO iteration: (state, reference, metrics, next) after the update of `step`.

  `ahead`: this step's rollout, started one step earlier (grpo.overlap); None samples it
  now. `next`: with grpo.overlap, step + 1's rollout, started on this update's starting
  params before the update is dispatched."""
  if ahead is None:
    parts = collect(rl, state.params, ref if rl.ref_source is RefSource.ROLLOUT else None,
                    _step_key(rl, step))
  else:
    with rl.loop.timer("rollout"):  # what of the rollout the last update did not hide
      parts = ahead.pending.result()
  nxt = (_start_ahead(rl, state.params, step + 1)
         if rl.grpo.overlap and step < rl.config.steps else None)
  before_update(rl, nxt)
  try:
    state, ref, train_metrics, update = _update(rl, state, ref, step, parts)
  except BaseException:
    rl_ahead.finish(nxt)  # not left running into a closed reward pool
    raise
  metrics = multihost.reduce_metrics(step_metrics(rl, parts, update, train_metrics))
  return state, ref, {**metrics, **(ahead.metrics() if ahead else {})}, nxt


def before_update(rl: RLRun, nxt: rl_ahead.Ahead | None) -> None:
  """grpo.overlap="rewards": the update is dispatched once the next samples are on the host,
  so the devices never run both. In several processes with reward models, once they are
  also scored: the models' forwards are device programs with collectives (the policy's
  mesh), which every process must dispatch in one order with the update's."""
  if nxt is None or rl.grpo.overlap != "rewards":
    return
  with rl.loop.timer("rollout"):
    nxt.sampled.wait()
    if jax.process_count() > 1 and rl.config.rewards.get("models"):
      nxt.pending.wait()  # its error, if any, stays for the next iteration's result()


def _update(rl: RLRun, state: TrainState, ref: Any, step: int, parts: list[ScoredRollout]):
  """(state, reference, train metrics, update batch): the update of `step` on `parts`."""
  with rl.loop.timer("update"):
    update = assemble(rl, parts)
    if multihost.any_process(update.live > 0):  # all run the update, or none
      host, pack_stats = rl.trainer.pack(update.batch)
      batch = rl.trainer.put_batch(host)  # the one host → mesh transfer
      state, train_metrics = rl.trainer.rl_step(
          state, batch, ref if rl.ref_source is RefSource.UPDATE else None)
      jax.block_until_ready(state)
      if pack_stats:
        train_metrics = {**train_metrics, **pack_stats,
                         "pack/compiled_shapes": float(rl.trainer.compiled_rl_shapes())}
    else:  # No group has a learning signal: an update would only apply decay/momentum.
      log.warning("step %d: no informative group; no update", step)
      train_metrics = {"skipped": np.zeros(1)}  # counts non-finite updates only
    ref = rl.logp.reset_ref(ref, state.params, step)
  return state, ref, train_metrics, update


def evaluate(rl: RLRun, params: Any, step: int) -> dict[str, float]:
  """Held-out eval of the current policy (same key every time) into WORKDIR/eval/step_N/."""
  key = jax.random.key(rl.config.seed + 1)
  reports = rl.evals.run(params, lambda _: key, rl.scorer.pool,
                         out_dir=rl.workdir / "eval" / f"step_{step:06d}")
  return suite_lib.metrics(reports)


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """The `rl` stage: GRPO iterations with checkpoints, metrics and periodic eval."""
  rl = setup(config, workdir)
  with rl.loop as loop, rl.scorer:
    start, state, ref, behaviour = initial_state(rl)
    if rl.evals.sets and start == 0:  # The starting model, with the same key and settings.
      t0 = time.perf_counter()
      loop.writer.write(0, evaluate(rl, state.params, 0))
      log.info("step-0 eval took %.1f s", time.perf_counter() - t0)
    # Resuming one step off-policy: replay the rollout that was pending at the checkpoint.
    ahead = None if behaviour is None else _start_ahead(rl, behaviour, start + 1, copy=False)
    wall = float(loop.summary.get("rl_wall_s", 0.0))  # rollout + reward + update seconds
    e = config.eval

    def one_step(step: int, tree: dict):
      nonlocal ahead, wall
      state, ref, metrics, ahead = iteration(rl, tree["train"], tree.get("ref"), step, ahead)
      wall += sum(metrics.get(f"time/{k}", 0.0) for k in ("rollout", "reward", "update"))
      if rl.evals.sets and ((e.every and step % e.every == 0) or step == config.steps):
        if ahead is not None:  # the reward pool serves one caller: the rollout ends first
          wall += ahead.pending.wait()
        with loop.timer("eval"):
          metrics.update(evaluate(rl, state.params, step))
        metrics.update(loop.timer.metrics())
      metrics["rl_wall_s"] = wall
      extra = {"data": rl.data.get_state() if ahead is None else ahead.data_state,
               "rl_wall_s": wall}
      # grpo.overlap: the pending rollout's params (at the last step, the policy itself)
      behaviour = (None if not rl.grpo.overlap else
                   state.params if ahead is None else ahead.behaviour)
      return _tree(state, ref, behaviour), metrics, extra

    try:
      tree, step = loop.run(_tree(state, ref, behaviour), start, one_step)
      if not loop.completed and ahead is not None:  # preempted: the save lands before the wait
        loop.ckpt.wait()
    finally:
      rl_ahead.finish(ahead)
    return loop.complete(tree["train"], step, lambda s: {
        "final": str(checkpoint.save_params(workdir / "final", s.params, rl.cfg))})
