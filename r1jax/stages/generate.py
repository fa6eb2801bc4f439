"""The `generate` stage: sample k responses per prompt, grade, filter, select, write a dataset.

R1's cold start, rejection sampling + SFT and distillation are all "sample many, keep the good
ones, train on them"; this stage is the first half, the `sft` stage the second.
1. Prompts (any format data/rows.py reads) are rendered with a template and split into
   batches of `batch_prompts`; with H processes, host h feeds the h-th H-th of every batch
   (all decode it together on the global mesh, each reading back its own rows). Batch b
   samples with fold_in(seed, b), so its samples never depend on which batches ran before
   (resume), nor on the process count.
2. The engine decodes batch b+1 on the mesh while the host grades batch b with the reward
   spec RL uses (pool workers, hard timeouts), then applies the filters (rewards/filters.py)
   and selects up to `select.per_prompt` accepted samples per prompt.
3. Rows stream to WORKDIR/<name>-h<host>.jsonl, committed batch by batch
   (generation/output.py), so a killed run re-run with the same command continues and ends
   with exactly the rows of an uninterrupted one:
     samples      SFT-ready {"prompt", "completion", …} rows the `sft` stage reads directly
                  (+ teacher top-k logprobs with output.top_k_logprobs, for logit distillation);
     stats        one row per prompt: pass rate, lengths, stop reasons, reasons per sample;
     rejected     (output.rejected) every rejected sample with its reasons;
     rl_prompts   the prompts whose pass rate is in [pass_rate.min, pass_rate.max], as rows
                  the `rl` stage reads: the ones that carry GRPO signal.
   WORKDIR/summary.json: counts per filter, tokens/s, wall time.
With output.readable, responses are first converted to R1's readable format
(data/formats.READABLE; the cold-start builder) and those that cannot be are rejected.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from r1jax import stages
from r1jax.core import checkpoint as ckpt_lib
from r1jax.core import multihost
from r1jax.core import sharding
from r1jax.core import storage
from r1jax.core.config import stage_group
from r1jax.core.errors import DataError
from r1jax.core.storage import Path
from r1jax.core.tokenizer import (TEMPLATES, load_tokenizer, tokenizer_fingerprint,
                                  tokenizer_path)
from r1jax.core.weights import check_vocab, load_model
from r1jax.data.formats import zero_to_readable
from r1jax.data.pipeline import prepare_prompts
from r1jax.data.rows import check_bad_share, load_rows
from r1jax.generation.engine import Engine, Samples
from r1jax.generation.output import ShardWriter, claim_folder, read_progress
from r1jax.generation.sampler import STOP_REASONS, stop_token_ids
from r1jax.rewards import filters as filters_lib
from r1jax.rewards.compose import RewardScorer, parse_spec, reward_inputs
from r1jax.rewards.reward_model import check_processes, load_models

# stages.run must not overwrite WORKDIR/config.json before the folder is claimed for this run.
RECORDS_OWN_CONFIG = True
OUTPUTS = ("samples", "stats", "rejected", "rl_prompts")
# Settings a re-run may change without making it another run (they change no row).
_VOLATILE = ("progress", "log_every", "tensorboard", "ckpt", "rewards.num_workers", "mesh")


def generate_config() -> ml_collections.ConfigDict:
  """The `generate` stage's config (defaults: R1's sampling protocol, verifier filter on)."""
  c = stage_group("generate", 0)
  c.data = ml_collections.ConfigDict(dict(
      prompts="",  # jsonl/parquet prompts: GSM8K, MATH, AIME/AMC, generic or code rows
      adapter="auto", template="r1_zero", system="",
      max_prompt_tokens=512,  # longer prompts are skipped and counted
      limit=0))  # the first N usable prompts only (0 = all)
  c.sampler = ml_collections.ConfigDict(dict(
      temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=1024, stop=()))
  c.k = 4  # samples per prompt
  c.batch_prompts = 8  # prompts per sampler call (k·batch_prompts rows decoded together)
  c.rewards = ml_collections.ConfigDict(dict(  # the RL reward spec (rewards/compose.py)
      num_workers=2, components=[{"name": "accuracy", "tasks": ["math"]},
                                 {"name": "format", "weight": 0.0}]))
  c.filters = ml_collections.ConfigDict(dict(  # rewards/filters.py: Filters
      verifier="accuracy", min_verifier=1.0, language="", min_language=0.95,
      max_paragraph_chars=0, code_blocks=False, repetition_ngram=0, repetition_max=4,
      truncated=True, structure=""))
  c.select = ml_collections.ConfigDict(dict(per_prompt=1, order="first"))  # 0 = all accepted
  c.pass_rate = ml_collections.ConfigDict(dict(min=0.01, max=0.99))  # rl_prompts kept
  c.output = ml_collections.ConfigDict(dict(
      readable=False,  # convert R1-Zero responses to the readable format (cold start)
      top_k_logprobs=0,  # store the teacher's top-k logprobs per token (logit distillation)
      rejected=False))  # also write every rejected sample with its reasons
  c.progress = True  # a progress line on stderr
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Config errors before any model or data is loaded."""
  filters_lib.Filters.from_config(config.filters)
  if config.k < 1 or config.batch_prompts < 1:
    raise ValueError(f"generate: need k >= 1 and batch_prompts >= 1, got {config.k}, "
                     f"{config.batch_prompts}")
  if config.data.template not in TEMPLATES:
    raise ValueError(f"generate: data.template {config.data.template!r} not in "
                     f"{sorted(TEMPLATES)}")
  if config.select.order not in filters_lib.SELECTIONS:
    raise ValueError(f"generate: select.order must be one of {filters_lib.SELECTIONS}")
  if config.output.readable and config.output.top_k_logprobs:
    raise ValueError("generate: output.readable rewrites the text, so the teacher's per-token "
                     "logprobs would not match it; use one or the other")
  if config.output.readable and config.filters.structure == "zero":
    raise ValueError("generate: output.readable converts each response to the readable format "
                     "before the filters run, so filters.structure='zero' would reject every "
                     "sample; use filters.structure='readable'")
  if not 0 <= config.pass_rate.min <= config.pass_rate.max <= 1:
    raise ValueError("generate: need 0 <= pass_rate.min <= pass_rate.max <= 1")
  keys = [c.key for c in parse_spec(config.rewards)[1]]
  if config.filters.verifier and config.filters.verifier not in keys:
    raise ValueError(f"generate: filters.verifier {config.filters.verifier!r} is not a reward "
                     f"key of config.rewards ({keys})")


def _file_sha1(path: str) -> str:
  h = hashlib.sha1()
  with storage.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _manifest(config, prompts_sha1: str) -> dict:
  """What makes two runs the same run: every setting that changes a row, and the inputs."""
  c = json.loads(config.to_json_best_effort())
  for field in _VOLATILE:
    group, _, key = field.rpartition(".")
    (c.get(group, {}) if group else c).pop(key, None)
  return {"config": c, "prompts_sha1": prompts_sha1, "hosts": jax.process_count(),
          "weights": _weights_fingerprint(config.model)}


def _weights_fingerprint(group) -> str | None:
  """sha1 over the weight files' names, sizes and mtimes (init_from, else hf_dir): the same
  path rewritten with other weights is another run. None for a random init."""
  folder = group.get("init_from") or group.get("hf_dir")
  if not folder:
    return None
  h = hashlib.sha1()
  for p in storage.files_under(folder):
    size, mtime_ns = storage.size_and_mtime_ns(p)
    h.update(f"{p.relative_to(folder)}\0{size}\0{mtime_ns}\n".encode())
  return h.hexdigest()


def _check_gold(rows: list[dict], bad: list, f: filters_lib.Filters, scorer) -> None:
  """A verifier needs every prompt's reference (gold / tests): a clear error before work."""
  if not f.verifier:
    return
  missing = [b for b in bad if b.reason == "missing_field" and "answer" in b.detail]
  comp = next(c for c in scorer.components if c.key == f.verifier)  # rows load gold-optional
  empty = [r["id"] for r in rows if (comp.tasks is None or r["task"] in comp.tasks)
           and "gold" in comp.fields.values() and not str(r.get("gold", "")).strip()]
  if missing or empty:
    where = f"line {missing[0].index}" if missing else f"row {empty[0]}"
    raise ValueError(
        f"filters.verifier={f.verifier!r} needs a gold answer in every prompt row, but "
        f"{len(missing) + len(empty)} rows have none (first: {where}). Add the answers, or "
        "set filters.verifier='' to generate without verifying.")


def _load_prompts(config, tok, scorer, f: filters_lib.Filters) -> tuple[list[dict], dict]:
  d = config.data
  rows, bad = load_rows(d.prompts, d.adapter, require_gold=False)
  _check_gold(rows, bad, f, scorer)
  if d.limit:
    rows = rows[:d.limit]
  items, too_long = prepare_prompts(rows, tok, d.template, d.max_prompt_tokens,
                                    d.system or None, source=d.prompts)
  check_bad_share(d.prompts, len(items), bad + too_long, config.max_bad_share)
  if not items:
    raise DataError(f"no usable prompts in {d.prompts} ({len(bad)} bad rows, {len(too_long)} "
                    f"over data.max_prompt_tokens={d.max_prompt_tokens})")
  return items, dict(collections.Counter(b.reason for b in bad + too_long))


# -------------------------------------------------------------------------- one batch


def _texts(samples: Samples, readable: bool) -> tuple[list[str], list[bool]]:
  """Output texts and whether each could be written in the requested format."""
  if not readable:
    return list(samples.texts), [True] * len(samples.texts)
  conv = [zero_to_readable(t) for t in samples.texts]
  return [c if c is not None else t for c, t in zip(conv, samples.texts)], [
      c is not None for c in conv]


def _teacher(samples: Samples, i: int, fp: dict) -> dict:
  """The KD fields of sample i: its token ids and the teacher's top-k per completion token."""
  n = int(samples.mask[i].sum())
  p = samples.prompt_tokens[i // samples.group][samples.prompt_mask[i // samples.group]]
  return {"prompt_ids": p.tolist(), "completion_ids": samples.tokens[i, :n].tolist(),
          "teacher": {"top_ids": samples.top_ids[i, :n].tolist(),
                      "top_logprobs": np.round(samples.top_logprobs[i, :n], 5).tolist(), **fp}}


def _finish_batch(config, items: list[dict], samples: Samples, texts: list[str],
                  converted: list[bool], rewards, f: filters_lib.Filters, fp: dict
                  ) -> tuple[dict[str, list[dict]], dict[str, int]]:
  """Filters, selection and the output rows of one graded batch (host only)."""
  k, out = samples.group, {name: [] for name in OUTPUTS}
  counts = dict.fromkeys(("prompts", "samples", "accepted", "selected", "signal_prompts",
                          *filters_lib.REASONS), 0)
  lengths = samples.lengths
  for p, item in enumerate(items):
    reasons, verified = [], []
    for j in range(k):
      i = p * k + j
      why = filters_lib.reject_reasons(
          f, texts[i], task=item["task"], truncated=bool(samples.truncated[i]),
          rewards={key: float(v[i]) for key, v in rewards.components.items()},
          failed={key: bool(v[i]) for key, v in rewards.failed.items()})
      if not converted[i] and "unreadable" not in why:
        why.append("unreadable")
      reasons.append(why)
      value = float(rewards.components[f.verifier][i]) if f.verifier else float("nan")
      if not np.isnan(value):  # the verifier judges this task
        verified.append(value >= f.min_verifier)
    accepted = [j for j in range(k) if not reasons[j]]
    rng = np.random.default_rng([config.seed, item["index"]])
    chosen = filters_lib.select(accepted, lengths[p * k:(p + 1) * k], config.select.per_prompt,
                                config.select.order, rng)
    pass_rate = float(np.mean(verified)) if verified else None
    for j in chosen:
      i = p * k + j
      row = {"id": item["id"], "prompt": item["prompt"], "completion": texts[i],
             "question": item["question"], "gold": item["gold"], "task": item["task"],
             "sample": j, "num_tokens": int(lengths[i]),
             "stop": STOP_REASONS[int(samples.stop_reason[i])],
             "rewards": {key: None if np.isnan(v[i]) else float(v[i])  # None: n/a
                         for key, v in rewards.components.items()}}
      out["samples"].append(row | (_teacher(samples, i, fp) if fp else {}))
    if config.output.rejected:
      out["rejected"] += [{"id": item["id"], "sample": j, "completion": texts[p * k + j],
                           "reasons": reasons[j]} for j in range(k) if reasons[j]]
    out["stats"].append({
        "id": item["id"], "index": item["index"], "k": k, "pass_rate": pass_rate,
        "accepted": len(accepted), "selected": len(chosen),
        "lengths": lengths[p * k:(p + 1) * k].tolist(),
        "stop": [STOP_REASONS[int(r)] for r in samples.stop_reason[p * k:(p + 1) * k]],
        "reasons": reasons})
    signal = pass_rate is not None and filters_lib.carries_signal(
        pass_rate, config.pass_rate.min, config.pass_rate.max)
    if signal:
      meta = item.get("meta") or {}
      out["rl_prompts"].append({"id": item["id"], "question": item["question"],
                                "answer": item["gold"], "task": item["task"],
                                "pass_rate": pass_rate,
                                **({"tests": meta["tests"]} if "tests" in meta else {})})
    counts.update(prompts=counts["prompts"] + 1, samples=counts["samples"] + k,
                  accepted=counts["accepted"] + len(accepted),
                  selected=counts["selected"] + len(chosen),
                  signal_prompts=counts["signal_prompts"] + int(signal))
    for why in reasons:
      for r in why:
        counts[r] += 1
  return out, counts


# ------------------------------------------------------------------------------- the run


class _Progress:
  """prompts done / total, accepted, tokens/s and ETA: one rewritten stderr line on a
  terminal, a new line every 30 s when stderr is a log file."""

  def __init__(self, total: int, done: int, accepted: int, enabled: bool):
    self.total, self.done, self.accepted, self.enabled = total, done, accepted, enabled
    self.start, self.start_done, self.tokens = time.perf_counter(), done, 0
    self.tty, self.last_line = sys.stderr.isatty(), -float("inf")

  def update(self, prompts: int, accepted: int, tokens: int) -> None:
    self.done, self.accepted, self.tokens = (self.done + prompts, self.accepted + accepted,
                                             self.tokens + tokens)
    if not self.enabled:
      return
    dt = max(time.perf_counter() - self.start, 1e-9)
    rate = (self.done - self.start_done) / dt
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_s = f"{eta / 60:.1f} min" if np.isfinite(eta) else "?"
    line = (f"generate: {self.done}/{self.total} prompts | accepted {self.accepted} | "
            f"{self.tokens / dt:.0f} tok/s | ETA {eta_s}")
    if self.tty:
      print(f"\r{line}  ", end="", file=sys.stderr, flush=True)
    elif time.perf_counter() - self.last_line >= 30 or self.done == self.total:
      self.last_line = time.perf_counter()
      print(line, file=sys.stderr, flush=True)


def summarize(out_dir: Path, wall_s: float | None = None) -> dict[str, Any]:
  """Totals over every host's committed batches: counts per filter, tokens/s, wall time."""
  records = read_progress(out_dir)
  keys = ("prompts", "samples", "accepted", "selected", "signal_prompts", "tokens",
          *filters_lib.REASONS)
  total = {key: int(sum(r["counts"].get(key, 0) for r in records)) for key in keys}
  seconds = sum(r["seconds"] for r in records)
  wait = sum(r["device_wait_s"] for r in records)
  return {"stage": "generate", **total, "batches": len(records),
          "rejected_by": {r: total[r] for r in filters_lib.REASONS},
          "accept_rate": total["accepted"] / max(total["samples"], 1),
          "busy_s": seconds, "device_wait_s": wait,
          "tokens_per_s": total["tokens"] / max(seconds, 1e-9),
          **({"wall_s": wall_s} if wall_s is not None else {})}


def _host_slice(items: list, b: int, per: int) -> tuple[list, int]:
  """This host's share of global batch b (`multihost.host_share`) and its real count."""
  return multihost.host_share(items[b * per:(b + 1) * per], per)


def _agreed_todo(n_batches: int, done: set[int]) -> list[int]:
  """The global batches some host has not committed: every host decodes them together (a
  collective); a host that already has one keeps its committed rows."""
  every = multihost.gather_json(sorted(done))
  return [b for b in range(n_batches) if any(b not in set(d) for d in every)]


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Generates, grades, filters and writes config.data.prompts' dataset into workdir."""
  validate(config)
  workdir, t_start = Path(workdir), time.perf_counter()
  check_processes("generate", config)
  if config.batch_prompts % jax.process_count():
    raise ValueError(f"generate: batch_prompts={config.batch_prompts} does not split over "
                     f"{jax.process_count()} processes; use a multiple of them")
  f = filters_lib.Filters.from_config(config.filters)
  tok = load_tokenizer(tokenizer_path(config))
  s = config.sampler
  stop_token_ids(tok, s.stop)
  mesh, rm_mesh = sharding.policy_and_reward_meshes(config.mesh.shape,
                                                    config.mesh.get("reward_devices", 0))
  with RewardScorer(config.rewards,
                    models=load_models(config.rewards.get("models"), rm_mesh)) as scorer:
    items, skipped = _load_prompts(config, tok, scorer, f)
    for index, item in enumerate(items):
      item["index"] = index
    cfg, _ = load_model(config.model, mesh, seed=config.seed, abstract=True)
    check_vocab(tok, cfg)  # before the weights are read or any output written
    manifest = _manifest(config, _file_sha1(config.data.prompts))
    resumed = multihost.run_once("generate-claim",
                                 lambda: claim_folder(workdir, manifest, OUTPUTS))
    stages.record_config(config, workdir)
    writer = ShardWriter(workdir, jax.process_index(), OUTPUTS)
    per = config.batch_prompts
    n_batches = -(-len(items) // per)
    todo = _agreed_todo(n_batches, writer.done)
    mine = sum(_host_slice(items, b, per)[1] for b in range(n_batches))
    done_prompts = sum(r["counts"]["prompts"] for r in writer.committed)
    progress = _Progress(mine, done_prompts, sum(r["counts"]["accepted"]
                                                 for r in writer.committed),
                         config.progress and jax.process_index() == 0)
    preempted = False
    if todo:
      cfg, params = load_model(config.model, mesh, seed=config.seed)
      engine = Engine(cfg, mesh, tok, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      max_new_tokens=s.max_new_tokens, max_prompt_len=config.data.max_prompt_tokens,
                      stop=tuple(s.stop), record_top_k=config.output.top_k_logprobs)
      fp = ({"vocab_size": tok.vocab_size, "tokenizer": tokenizer_fingerprint(tokenizer_path(
          config))} if config.output.top_k_logprobs else {})
      with ckpt_lib.Preemption() as stop:
        preempted = _decode_all(config, engine, params, items, todo, writer, scorer, f, fp,
                                progress, stop)
    if progress.enabled and progress.tty and todo:
      print(file=sys.stderr, flush=True)
  multihost.barrier("generate-committed")  # every host's last batch, before the totals
  summary = summarize(workdir, time.perf_counter() - t_start)
  summary.update(resumed=resumed, skipped_rows=skipped, prompts_total=len(items),
                 preempted=preempted)
  if jax.process_index() == 0 and not preempted:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _graded(config, b: int, chunk, samples, texts, converted, f, fp: dict, wait_s: float,
            rewards) -> tuple[int, list, dict]:
  """Batch b's rows and counts once its rewards are in (filters, selection, SFT rows)."""
  rows, counts = _finish_batch(config, chunk, samples, texts, converted, rewards, f, fp)
  counts.update(tokens=int(samples.lengths.sum()), device_wait_s=wait_s)
  return b, rows, counts


def _decode_all(config, engine: Engine, params, items, todo: list[int], writer: ShardWriter,
                scorer: RewardScorer, f, fp: dict, progress: _Progress, stop) -> bool:
  """The pipelined loop: decode batch b+1 while the pool grades batch b; then filter and
  commit batch b.

  Returns whether it stopped early for a SIGTERM (every committed batch is kept).
  """
  per, k, key = config.batch_prompts, config.k, jax.random.key(config.seed)
  graded, last = None, time.perf_counter()  # graded: Pending (batch, rows, counts)
  for pos in range(len(todo) + 1):
    launched = None
    # every host launches the same batches: a SIGTERM to one stops all at the same batch
    if pos < len(todo) and not multihost.any_process(stop.requested):
      b = todo[pos]
      mine, real = _host_slice(items, b, per)
      launched = (b, mine[:real], engine.launch(params, [it["prompt_ids"] for it in mine],
                                                jax.random.fold_in(key, b), k))
    if graded is not None:  # the previous batch, graded in the pool during this decode
      b0, rows, counts = graded.result()
      now = time.perf_counter()
      if b0 not in writer.done:  # else this host committed it before a resume
        writer.commit(b0, rows, {"counts": counts, "seconds": now - last,
                                 "device_wait_s": counts.pop("device_wait_s")})
        progress.update(counts["prompts"], counts["accepted"], counts["tokens"])
      last = now
      graded = None
    if launched is None:
      return pos < len(todo)
    b, chunk, rollout = launched
    t0 = time.perf_counter()
    samples = engine.collect(rollout, k, prompts=len(chunk))
    if not chunk:  # a short last batch held none of this host's prompts: only filler rows
      none = (b, {}, {"prompts": 0, "samples": 0, "accepted": 0, "tokens": 0,
                      "device_wait_s": time.perf_counter() - t0})
      # scored all the same: a reward model's forward in several processes needs this host
      graded = scorer.submit([]).then(lambda _, none=none: none)
      continue
    texts, converted = _texts(samples, config.output.readable)
    wait_s = time.perf_counter() - t0
    graded = scorer.submit(reward_inputs(chunk, texts, samples.lengths, k)).then(
        functools.partial(_graded, config, b, chunk, samples, texts, converted, f, fp, wait_s))
  return False

