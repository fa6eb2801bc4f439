"""The RL stage: GRPO from rule (and model) rewards, as in R1-Zero and R1's RL stages.

One iteration:
1. Prompts: the grain pipeline yields B problems (checkpointable position).
2. Rollout: the jitted sampler draws G completions per prompt from the current
   policy; tokens, masks and per-token logprobs stay on the device.
3. Rewards (host): completions are detokenised and submitted to the reward
   scorer's process pool at once; meanwhile the device computes the frozen
   reference's logprobs (β > 0), so the two overlap.
4. Advantages: group-normalised over each prompt's G rewards. With DAPO
   dynamic sampling, groups whose rewards are all equal are dropped and the
   batch is refilled from further prompts (up to a bounded number of tries).
5. Update: μ passes × mini-batches of the clipped surrogate + β·k3 (one
   jitted, donated call); the reference is reset to the policy every N steps.
6. Bookkeeping: metrics (rewards by component, KL, clips, entropy, lengths,
   reflective words, time split) to JSONL/TensorBoard/console; periodic
   held-out eval; orbax checkpoints of the train state, reference and data
   position; SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.sampler import STOP_LENGTH, Rollout
from r1jax.train_step import RolloutBatch

log = logging.getLogger(__name__)


def to_batch(rollout: Rollout, advantages_N, group: int) -> RolloutBatch:
  """Prompt (left-padded, repeated G times) + completion rows for `Trainer.rl_step`."""
  prompt_NxS = jnp.repeat(rollout.prompt_tokens, group, axis=0)
  pmask_NxS = jnp.repeat(rollout.prompt_mask, group, axis=0)
  return RolloutBatch(
      tokens=jnp.concatenate([prompt_NxS, rollout.tokens], axis=1),
      mask=jnp.concatenate([pmask_NxS, rollout.mask], axis=1),
      completion_mask=rollout.mask,
      old_logp=rollout.logprobs,
      advantages=jnp.asarray(advantages_N, jnp.float32),
      truncated=jnp.asarray(np.asarray(rollout.stop_reason) == STOP_LENGTH))


def select_rows(batch: RolloutBatch, rows: np.ndarray) -> RolloutBatch:
  """The batch restricted to `rows` (host indices), e.g. the informative groups."""
  return jax.tree.map(lambda x: None if x is None else x[rows], batch,
                      is_leaf=lambda x: x is None)


def completions_text(tokenizer, rollout: Rollout) -> list[str]:
  """Decoded completions (padding and special ids dropped), one per row."""
  tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
  return [tokenizer.decode(tokenizer.strip_specials(t[m])) for t, m in zip(tokens, mask)]


def reward_samples(problems: list[dict], texts: list[str], lengths: np.ndarray,
                   group: int) -> list[dict]:
  """Scorer inputs: each problem's fields repeated for its G completions."""
  out = []
  for i, text in enumerate(texts):
    p = problems[i // group]
    out.append({**p.get("meta", {}), **{k: v for k, v in p.items() if k != "meta"},
                "completion": text, "num_tokens": int(lengths[i])})
  return out


def _rollout_once(ctx, params, problems, key):
  """Sample, start the reference forward, score on the host: one batch of B groups."""
  g = ctx.grpo.group_size
  with ctx.timer("rollout"):
    rollout = ctx.sampler.generate(params, [p["prompt_ids"] for p in problems], ctx.sp, key,
                                   group=g)
    batch = ctx.trainer.put_batch(to_batch(rollout, np.zeros(len(problems) * g), g))
    # Dispatched asynchronously: the device works on it while the host scores.
    ref_logp = ctx.trainer.logprobs(ctx.ref, batch) if ctx.grpo.beta else None
    texts = completions_text(ctx.tokenizer, rollout)
  with ctx.timer("reward"):
    lengths = np.asarray(rollout.mask).sum(1)
    rewards = ctx.scorer.score(reward_samples(problems, texts, lengths, g))
  return rollout, batch, ref_logp, texts, rewards


def _informative(ctx, rewards) -> np.ndarray:
  """(B,) bool: groups whose rewards vary (per component when advantages are per component)."""
  from r1jax import losses
  g = ctx.grpo.group_size
  if ctx.grpo.reward_norm != "per_component":
    return np.asarray(losses.informative_groups(rewards.total_B, g))
  return np.any([np.asarray(losses.informative_groups(np.nan_to_num(v), g))
                 for v in rewards.components.values()], axis=0)


def _pad_prompts(batch: RolloutBatch, width: int) -> RolloutBatch:
  """Left-pads the prompt part of a batch to `width` total columns (rollouts differ in S)."""
  extra = width - batch.tokens.shape[1]
  if extra == 0:
    return batch
  pad = lambda x: jnp.pad(x, ((0, 0), (extra, 0)))
  return dataclasses.replace(batch, tokens=pad(batch.tokens), mask=pad(batch.mask))


def _collect(ctx, params, step_key):
  """B groups for one update; with dynamic sampling, informative groups first (DAPO)."""
  b = ctx.config.data.batch
  parts, informative, tries = [], 0, 0
  while True:
    problems = next(ctx.data)
    part = _rollout_once(ctx, params, problems, jax.random.fold_in(step_key, tries))
    tries += 1
    keep = _informative(ctx, part[4]) if ctx.config.dynamic_sampling else np.ones(b, bool)
    parts.append((part, keep))
    informative += int(keep.sum())
    if informative >= b or tries > ctx.config.max_refill:
      break
  return parts, tries


def _assemble(ctx, parts):
  """One RolloutBatch of B groups: informative groups first, then masked filler.

  The row count never changes, so the update compiles once per prompt width; filler
  groups (when too few informative ones were found) have no loss tokens. Rollouts
  may have different prompt buckets: all are left-padded to the widest.
  """
  g, b = ctx.grpo.group_size, ctx.config.data.batch
  chosen = [(pi, gi) for pi, (_, keep) in enumerate(parts) for gi in np.flatnonzero(keep)][:b]
  live = len(chosen)
  chosen += [(0, gi) for gi in range(b - live)]
  adv = [_advantages(ctx, part[4]) for part, _ in parts]
  if len(parts) == 1 and live == b:  # Every group kept, in order: no gather needed.
    (_, batch, ref_logp, part_texts, _), _ = parts[0]
    return dataclasses.replace(batch, advantages=jnp.asarray(adv[0]),
                               ref_logp=ref_logp), list(part_texts), live
  width = max(part[1].tokens.shape[1] for part, _ in parts)
  pieces, texts = [], []
  for n, (pi, gi) in enumerate(chosen):
    (_, batch, ref_logp, part_texts, _), _ = parts[pi]
    batch = _pad_prompts(batch, width)
    rows = np.arange(gi * g, (gi + 1) * g)
    sub = select_rows(batch, rows)
    pieces.append(RolloutBatch(
        sub.tokens, sub.mask, sub.completion_mask & (n < live), sub.old_logp,
        adv[pi][rows], sub.truncated, None if ref_logp is None else ref_logp[rows]))
    texts += [part_texts[r] for r in rows]
  merged = jax.tree.map(lambda *xs: None if xs[0] is None else jnp.concatenate(xs), *pieces,
                        is_leaf=lambda x: x is None)
  return merged, texts, live


def _advantages(ctx, rewards) -> np.ndarray:
  """Group-normalised advantages of one rollout (per component first if configured)."""
  from r1jax import losses
  g = ctx.grpo
  if g.reward_norm == "per_component":
    comps = ctx.scorer.components
    r = np.stack([np.nan_to_num(rewards.components[c.key]) for c in comps], axis=1)
    weights = [c.weight for c in comps]
  else:
    r, weights = rewards.total_B, None
  return np.asarray(losses.group_advantages(r, g.group_size, scale=g.adv_scale, eps=g.adv_eps,
                                            ddof=g.adv_ddof, reward_norm=g.reward_norm,
                                            weights_C=weights))


class _Context:
  """What one RL run holds fixed: config, model, sampler, trainer, data, scorer, timer."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _step_metrics(ctx, parts, tries, live, texts, train_metrics) -> dict[str, float]:
  from r1jax import metrics as metrics_lib
  first_rollout, first_rewards = parts[0][0][0], parts[0][0][4]
  out = dict(first_rewards.metrics())
  # Per-update values (μ·M of them) averaged; skipped updates summed.
  out.update({k: float(np.mean(np.asarray(v))) for k, v in train_metrics.items()})
  out["skipped"] = float(np.sum(np.asarray(train_metrics["skipped"])))
  if "reward/accuracy" in out:
    out["accuracy"] = out["reward/accuracy"]
  lengths = np.asarray(first_rollout.mask).sum(1)
  out.update(metrics_lib.response_stats(lengths))
  out.update(metrics_lib.reflection_counts(texts[:live * ctx.grpo.group_size]))
  reasons = np.asarray(first_rollout.stop_reason)
  for code, name in enumerate(("length", "eos", "stop")):
    out[f"stop/{name}"] = float(np.mean(reasons == code))
  out["dynamic/informative_groups"] = float(live)
  out["dynamic/rollouts"] = float(tries)
  out.update({f"data/skipped_{k}": float(v) for k, v in ctx.data.skipped.items()})
  out.update(ctx.timer.metrics())
  step_s = sum(v for k, v in out.items() if k.startswith("time/"))
  out["tokens_per_s"] = float(lengths.sum() * tries / max(step_s, 1e-9))
  return out


def format_rate(report) -> float:
  """Share of a report's completions that satisfy the strict R1-Zero format."""
  from r1jax.rewards.format import format_reward
  texts = [t for q in (report.completions or []) for t in q]
  return float(np.mean([format_reward(t) for t in texts])) if texts else float("nan")


def load_eval_sets(e) -> list[tuple[str, list[dict]]]:
  """(name, rows) of each benchmark in eval.benchmarks (first eval.limit rows)."""
  from r1jax.datasets import load_rows
  from r1jax.evaluate import benchmark_name
  out = []
  for path in filter(None, (p.strip() for p in e.benchmarks.split(","))):
    rows, _ = load_rows(path, limit=e.limit or None)  # bad rows are logged there
    out.append((benchmark_name(path), rows))
  return out


def _evaluate(ctx, cfg, params, workdir: Path, step: int) -> dict[str, float]:
  """Held-out eval of the current policy (same key every time); reports to WORKDIR/eval/."""
  from r1jax import evaluate as eval_lib
  e, out = ctx.config.eval, {}
  for name, rows in ctx.eval_sets:
    report = eval_lib.evaluate(
        params, cfg, ctx.tokenizer, rows, sampler=ctx.eval_sampler,
        key=jax.random.key(ctx.config.seed + 1), k=e.k, temperature=e.temperature,
        top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens, stop=tuple(e.stop),
        template=e.template, max_prompt_tokens=e.max_prompt_tokens, batch_size=e.batch_size,
        benchmark=name, pool=ctx.scorer.pool, progress=False)
    folder = workdir / "eval" / f"step_{step:06d}"
    report.to_json(folder / f"{name}.json")
    report.save_completions(folder / f"{name}.completions.jsonl")
    out.update(eval_lib.summary_metrics(report))
    out[f"eval/{name}/format"] = format_rate(report)
  return out


def run(config, workdir: Path) -> dict:
  """The `rl` stage: GRPO iterations with checkpoints, metrics and periodic eval."""
  from r1jax import checkpoint as ckpt_lib
  from r1jax import data as data_lib
  from r1jax import sampler as sampler_lib
  from r1jax import sharding
  from r1jax.config import grpo_config, opt_config
  from r1jax.loop import TrainLoop
  from r1jax.rewards.compose import RewardScorer
  from r1jax.stage_configs import tokenizer_path
  from r1jax.tokenizer import load_tokenizer
  from r1jax.train_step import make_trainer

  grpo = grpo_config(config.grpo)
  mesh = sharding.make_mesh(config.mesh.shape)
  tok = load_tokenizer(tokenizer_path(config))
  # Everything that can fail on bad input fails here, before any device work.
  pipeline = data_lib.PromptPipeline(
      config.data.train, tok, config.data.batch, template=config.data.template,
      max_prompt_tokens=config.data.max_prompt_tokens, seed=config.seed,
      adapter=config.data.adapter)
  eval_sets = load_eval_sets(config.eval)
  # Resuming: only shapes are read here; the weights come from the run's own checkpoint.
  resuming = ckpt_lib.has_checkpoint(workdir / "checkpoints")
  cfg, params = ckpt_lib.load_model(config.model, mesh, seed=config.seed, abstract=resuming)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids, the model only {cfg.vocab_size}")
  for name, prompt, new in (("data/sampler", config.data.max_prompt_tokens,
                              config.sampler.max_new_tokens),
                             ("eval", config.eval.max_prompt_tokens, config.eval.max_new_tokens)):
    if prompt + new > cfg.max_position and (name != "eval" or eval_sets):
      raise ValueError(f"{name}: max_prompt_tokens {prompt} + max_new_tokens {new} exceeds the "
                       f"model's max_position {cfg.max_position}")
  trainer = make_trainer(cfg, opt_config(config.opt), mesh, grpo)
  if resuming:  # Restore targets only: nothing is allocated twice.
    state = ckpt_lib.abstract_like(jax.eval_shape(trainer.init_state, params),
                                   trainer.state_shardings)
    ref = (ckpt_lib.abstract_like(params, trainer.param_shardings, jnp.dtype(grpo.ref_dtype))
           if grpo.beta else None)
  else:
    state = trainer.init_state(params)
    ref = trainer.make_ref(state.params) if grpo.beta else None
  sp = sampler_lib.SamplingParams(
      temperature=grpo.temperature, top_p=config.sampler.top_p, top_k=config.sampler.top_k,
      max_new_tokens=config.sampler.max_new_tokens, eos_id=tok.eos_id,
      stop_ids=sampler_lib.stop_token_ids(tok, config.sampler.stop), pad_id=tok.pad_id)
  data_it = iter(pipeline)
  ctx = _Context(config=config, grpo=grpo, tokenizer=tok, trainer=trainer, sp=sp,
                 sampler=sampler_lib.Sampler(cfg, mesh,
                                             max_prompt_len=config.data.max_prompt_tokens),
                 eval_sampler=sampler_lib.Sampler(cfg, mesh,
                                                  max_prompt_len=config.eval.max_prompt_tokens),
                 eval_sets=eval_sets, data=data_it)
  base_key = jax.random.key(config.seed)
  with TrainLoop(config, workdir, "rl") as loop, RewardScorer(config.rewards) as scorer:
    ctx.scorer, ctx.timer = scorer, loop.timer
    tree = lambda st, rf: {"train": st, **({"ref": rf} if rf is not None else {})}
    start = 0
    restored = loop.resume(tree(state, ref))
    if resuming and not restored:
      raise RuntimeError(f"{workdir}/checkpoints has step folders but none could be restored")
    if restored:
      start, restored_tree, extra = restored
      state, ref = restored_tree["train"], restored_tree.get("ref")
      data_it.set_state(extra["data"])
      loop.summary["rl_wall_s"] = extra.get("rl_wall_s", 0.0)
    ctx.ref = ref
    step = start
    if eval_sets and start == 0:  # The starting model, with the same key and settings.
      t0 = time.perf_counter()
      loop.writer.write(0, _evaluate(ctx, cfg, state.params, workdir, 0))
      log.info("step-0 eval took %.1f s", time.perf_counter() - t0)
    wall = float(loop.summary.get("rl_wall_s", 0.0))  # rollout + reward + update seconds
    for step in range(start + 1, config.steps + 1):
      parts, tries = _collect(ctx, state.params, jax.random.fold_in(base_key, step))
      with ctx.timer("update"):
        batch, texts, live = _assemble(ctx, parts)
        if live:
          state, train_metrics = trainer.rl_step(state, trainer.put_batch(batch), ctx.ref)
          jax.block_until_ready(state)
        else:  # No group has a learning signal: an update would only apply decay/momentum.
          log.warning("step %d: no informative group; update skipped", step)
          train_metrics = {"skipped": np.ones(grpo.mu * grpo.minibatches)}
        ctx.ref = trainer.maybe_reset_ref(ctx.ref, state, step)
      metrics = _step_metrics(ctx, parts, tries, live, texts, train_metrics)
      wall += sum(metrics[f"time/{k}"] for k in ("rollout", "reward", "update"))
      metrics["rl_wall_s"] = wall
      e = config.eval
      if eval_sets and ((e.every and step % e.every == 0) or step == config.steps):
        with ctx.timer("eval"):
          metrics.update(_evaluate(ctx, cfg, state.params, workdir, step))
        metrics.update(ctx.timer.metrics())
      extra = {"data": data_it.get_state(), "rl_wall_s": wall}
      if loop.end_step(step, metrics, tree(state, ctx.ref), extra):
        break
    if loop.completed and step == config.steps:
      loop.summary["final"] = str(ckpt_lib.save_params(workdir / "final", state.params, cfg))
    return loop.finish(step)
