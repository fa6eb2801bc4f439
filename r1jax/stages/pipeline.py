"""The `pipeline` stage: several stages in order, each in its own sub-directory, resumable.

Two forms. With `config.order` (a tuple of names, each a stage config in the pipeline
config), those stages run in turn in WORKDIR/<name>; a stage that finished (its done.json)
is skipped on a re-run, and `config.report` compares the eval stages side by side
(experiments/tiny_distill.py). Without it, the R1-Zero form below.

The miniature R1-Zero (experiments/tiny_zero.py) is one pipeline:
1. data: the synthetic arithmetic world (r1jax/data/synthetic.py) and a sentencepiece tokenizer;
2. base: pretrain the tiny base on the synthetic web corpus (the `sft` stage);
3. rl: GRPO from that base with accuracy + format rewards (the `rl` stage), which evaluates the
   held-out split before its first update (the base) and after its last (the policy), with the
   same key and sampling settings;
4. report: base vs RL side by side (report.json / report.md) and PNG curves.
A stage whose output exists is skipped (data, base), or resumed from its checkpoint (rl), so
re-running the same command after an interruption continues where it stopped. Strings in
stage configs may hold `{workdir}`, replaced by the pipeline's working directory.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from r1jax import stages
from r1jax.core import multihost
from r1jax.core import storage
from r1jax.core.config import config_changes
from r1jax.core.errors import DataError
from r1jax.core.metrics import read_metrics
from r1jax.core.plots import plot
from r1jax.core.storage import Path
from r1jax.core.tokenizer import train_sentencepiece
from r1jax.data import scenarios, synthetic
from r1jax.evaluation import report as eval_report
from r1jax.evaluation.suite import format_rate
from r1jax.generation.output import read_rows
from r1jax.rewards.model_specs import NORM_FILE
from r1jax.stages import r1_report

log = logging.getLogger(__name__)


def resolve(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
  """A copy of a stage config with `{workdir}` in every string replaced (then locked).

  A nested pipeline is returned as is: it resolves `{workdir}` against its own folder.
  """
  if config.get("stage") == "pipeline":
    return config

  def sub(x: Any) -> Any:
    if isinstance(x, str):
      return x.replace("{workdir}", str(workdir))
    if isinstance(x, dict):
      return {k: sub(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(sub(v) for v in x)
    return x

  out = ml_collections.ConfigDict(sub(config.to_dict()))
  out.lock()
  return out


def _run_stage(name: str, config, workdir: Path) -> dict:
  t0 = time.perf_counter()
  print(f"[pipeline] {name}: {config.stage} in {workdir}", flush=True)
  out = stages.run(config, str(workdir))
  seconds = time.perf_counter() - t0
  log.info("pipeline stage %s took %.0f s", name, seconds)
  return {**(out or {}), "pipeline_wall_s": round(seconds, 1)}  # this run's share (a resume's)


def _prepare_once(out_dir: Path, settings: dict, make) -> dict[str, str]:
  """make() (files written into out_dir, {name: path}) once; a re-run with other settings is
  refused, since every later stage was trained on that data."""
  done = out_dir / "done.json"
  if done.exists():
    out = json.loads(done.read_text())
    changes = config_changes(out.pop("settings", settings), settings, "")
    if changes:
      raise ValueError(f"{out_dir} was generated with other settings: {'; '.join(changes)}. "
                       "Use a new --workdir: every later stage was trained on that data.")
    return out
  out = {k: str(v) for k, v in make().items()}
  done.write_text(json.dumps({**out, "settings": settings}, indent=2))
  return out


def prepare_data(s: ml_collections.ConfigDict, out_dir: Path, seed: int) -> dict[str, str]:
  """Synthetic problems, corpus and tokenizer in out_dir (skipped when already there). An
  optional `world` group holds `synthetic.World`'s fields (levels, Chinese and self-checked
  shares); without it, R1-Zero's original world."""

  def make():
    world = synthetic.World(**s.world.to_dict()) if "world" in s else None
    paths = synthetic.write_dataset(out_dir, corpus_docs=s.corpus_docs,
                                    train_problems=s.train_problems,
                                    held_out_problems=s.held_out_problems, seed=seed,
                                    world=world)
    model = train_sentencepiece(synthetic.tokenizer_texts(paths["corpus"]),
                                out_dir / "tokenizer", s.vocab_size)
    return {**paths, "tokenizer": model}

  return _prepare_once(out_dir, {"synthetic": s.to_dict(), "seed": seed}, make)


def prepare_scenarios(s: ml_collections.ConfigDict, out_dir: Path, seed: int,
                      world: ml_collections.ConfigDict | None = None) -> dict[str, str]:
  """The all-scenario world's files (r1jax/data/scenarios.py) in out_dir, once; with `world`
  (the synthetic group's), its arithmetic is drawn from that world."""
  w = synthetic.World(**world.to_dict()) if world is not None else None
  settings = {"scenarios": s.to_dict(), "seed": seed}
  if w is not None:
    settings["world"] = world.to_dict()
  return _prepare_once(out_dir, settings, lambda: scenarios.write_scenarios(
      out_dir, seed=seed, world=w, **s.to_dict()))


def last_number_accuracy(report) -> float:
  """Share of completions whose last integer is the gold, whatever the answer format.

  A format-blind check of the arithmetic itself, reported beside pass@1 (which needs an
  extractable answer) so that a gain from the format alone is visible as such.
  """
  hits = [bool(nums) and nums[-1] == q.gold
          for q, texts in zip(report.questions, report.completions or [])
          for nums in (re.findall(r"-?\d+", t) for t in texts)]
  return float(np.mean(hits)) if hits else float("nan")


def _report_row(path: Path) -> dict[str, Any]:
  """An eval report's summary plus the format rate and last-number accuracy, which read the
  completions saved beside it (`<benchmark>.completions.jsonl`)."""
  rep = eval_report.Report.from_json(path)
  completions = path.with_suffix(".completions.jsonl")
  if completions.exists():
    rep.completions = [json.loads(l)["completions"] for l in completions.open()]
  return {**rep.summary(), "format": format_rate(rep),
          "last_number_acc": last_number_accuracy(rep)}


def _changed_since_last_run(name: str, config, stage_dir: Path, allowed: set[str]) -> bool:
  """Whether a stage that already ran here must run again for allowed changes.

  A finished (or partly run) stage whose recorded config differs in any other field stops
  the pipeline, naming the fields, instead of reporting stale results under a new config.
  """
  recorded = stage_dir / "config.json"
  if not recorded.exists():
    return False
  changes = config_changes(json.loads(recorded.read_text()),
                           json.loads(config.to_json_best_effort()), f"{name}.", added_ok=True)
  refused = [c for c in changes if c.split(":", 1)[0] not in allowed]
  if refused:
    fields = ",".join(c.split(":", 1)[0] for c in refused)
    raise ValueError(
        f"{stage_dir} was run with other settings: {'; '.join(refused)}. Use a new --workdir, "
        f"or continue this run with --config.allow_changes={fields} (for example after "
        "raising rl.steps: the stage resumes from its checkpoints)")
  return bool(changes)


# stages.run leaves WORKDIR/config.json to `run`, which writes it once a re-run is accepted.
RECORDS_OWN_CONFIG = True
_PATH_FIELDS = ("tokenizer", "model.init_from", "model.hf_dir", "data.train", "eval.benchmarks",
                "data.prompts")
_R1_ZERO = ("base", "rl")  # the default order: experiments/tiny_zero.py


def _order(config) -> tuple[str, ...]:
  return tuple(config.get("order") or _R1_ZERO)


def _input_paths(config) -> list[tuple[str, str]]:
  """(field, path) for each input file a stage config names (a field may join several with
  commas, as an SFT stage's data.train does)."""
  out = []
  for field in _PATH_FIELDS:
    group, _, key = field.rpartition(".")
    section = config.get(group) if group else config
    value = section.get(key, "") if section else ""
    out += [(field, p.strip()) for p in str(value).split(",") if p.strip()]
  return out


def validate(config) -> None:
  """Every stage config resolves and type-checks before the first stage runs; input files
  that no earlier stage writes (no `{workdir}` in them) must exist."""
  for name in _order(config):
    if name not in config:
      raise ValueError(f"pipeline: order names {name!r}, which the config does not define")
    stages.validate(resolve(config[name], Path("/nonexistent-workdir")))
    for field, path in _input_paths(config[name]):
      if "{workdir}" not in path and not Path(path).exists():
        raise FileNotFoundError(f"{name}.{field}: {path} does not exist")


def _check_samples(name: str, config, workdir: Path, summary: dict) -> None:
  """DataError before a stage that trains on an earlier generate stage's samples when that
  stage kept none: the counts and what rejected them, not a missing-file error later."""
  for _, path in _input_paths(config):
    p = Path(path)
    producer = p.parent.name if p.parent.parent == workdir else ""
    made = summary.get(producer) or {}
    if made.get("stage") == "generate" and not made.get("selected") and not p.exists():
      reasons = {k: v for k, v in (made.get("rejected_by") or {}).items() if v}
      raise DataError(
          f"pipeline: {name} trains on {producer}'s samples, but {producer} kept none of "
          f"its {made.get('samples')} samples (rejected by: {reasons}). The model it sampled "
          "from is too weak for the filters: train it longer, or relax its filters.")


def _run_chain(config, workdir: Path, allowed: set[str]) -> dict:
  """config.order's stages in turn, each in WORKDIR/<name>; finished ones (done.json) skipped."""
  resolved = {name: resolve(config[name], workdir) for name in _order(config)}
  rerun = {name: _changed_since_last_run(name, c, workdir / name, allowed)
           for name, c in resolved.items()}
  stages.record_config(config, workdir)
  summary: dict[str, Any] = {"stage": "pipeline"}
  # One-time work on process 0; its failure stops every process alike (multihost.run_once).
  if "synthetic" in config:
    summary["data"] = multihost.run_once("pipeline-data", lambda: prepare_data(
        config.synthetic, workdir / "data", config.seed))
  if "scenarios" in config:
    world = config.synthetic.get("world") if "synthetic" in config else None
    summary["scenarios"] = multihost.run_once("pipeline-scenarios", lambda: prepare_scenarios(
        config.scenarios, workdir / "scenarios", config.seed, world))
  lead = jax.process_index() == 0
  for name, c in resolved.items():
    done = workdir / name / "done.json"
    if done.exists() and not rerun[name]:
      summary[name] = json.loads(done.read_text())
      continue
    _check_samples(name, c, workdir, summary)
    out = _run_stage(name, c, workdir / name)
    if out.get("preempted"):
      return {**summary, "preempted": True}
    multihost.barrier(f"pipeline-{name}")  # every host's share of the stage is written
    if lead:
      done.write_text(json.dumps(out, indent=2, default=str))
    summary[name] = out
  if lead and config.get("report", {}).get("kind") == "r1":
    summary["report"] = r1_report.write_report(config, workdir)
  elif lead and config.get("report"):
    summary["report"] = compare_evals(config, workdir)
  return summary


def compare_evals(config, workdir: Path) -> dict[str, Any]:
  """The eval stages of a chain side by side: report.json / report.md in workdir.

  config.report: {"reference": eval stage the others are a share of (the teacher),
  "base": eval stage the others' gain is measured from, optionally "rewards" and
  "reward_models" (`compare_rewards`)}. pass@1's standard error (the report's) is over
  questions (each question's share of correct samples).
  """
  rows, lines = _eval_table({n: workdir / n / "eval" for n in config.order
                             if config[n].stage == "eval"},
                            config.report.get("reference", ""), config.report.get("base", ""))
  if config.report.get("rewards"):
    rows["rewards"], more = compare_rewards(config, workdir)
    lines += more
  _write_report(workdir, rows, lines)
  return rows


def _eval_table(eval_dirs: dict[str, Path], ref: str, base: str) -> tuple[dict, list[str]]:
  """Each benchmark's eval reports (one per label) side by side: rows and markdown lines."""
  rows: dict[str, dict] = {}
  for name, folder in eval_dirs.items():
    for path in storage.glob(folder, "*.json"):
      rows.setdefault(path.stem, {})[name] = _report_row(path)
  lines = []
  for bench, by_stage in rows.items():
    lines += [f"### {bench}", "", "| model | pass@1 (%) | ± s.e. | cons@k (%) | format (%) | "
              "last number right (%) | mean tokens | of reference | points over base |",
              "|---|" + "---:|" * 8]
    for name, s in by_stage.items():
      if ref in by_stage:  # NaN when the reference solves nothing
        r = by_stage[ref]["pass@1"]
        s["of_reference"] = s["pass@1"] / r if r > 0 else float("nan")
      if base in by_stage:
        s["points_over_base"] = 100 * (s["pass@1"] - by_stage[base]["pass@1"])
      lines.append(f"| {name} | {100 * s['pass@1']:.1f} | {100 * s['pass@1_stderr']:.1f} | "
                   f"{100 * s['cons@k']:.1f} | {100 * s['format']:.1f} | "
                   f"{100 * s['last_number_acc']:.1f} | "
                   f"{s.get('mean_tokens', float('nan')):.1f} | "
                   f"{100 * s.get('of_reference', float('nan')):.1f} % | "
                   f"{s.get('points_over_base', float('nan')):+.1f} |")
    lines.append("")
  return rows, lines


def _write_report(workdir: Path, rows: dict, lines: list[str]) -> None:
  (workdir / "report.json").write_text(json.dumps(rows, indent=2, default=float))
  (workdir / "report.md").write_text("\n".join(lines))
  print("\n".join(lines), flush=True)


def reward_means(stage_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
  """A generate stage's samples: each task's mean reward per component, {task: {key: {"mean",
  "se", "prompts"}}}. The mean is over prompts (each prompt's mean over its samples), so is
  the standard error; components that do not judge a task (null) are left out."""
  values: dict[str, dict[str, dict[str, list[float]]]] = {}
  for row in read_rows(stage_dir, "samples"):
    for key, v in row["rewards"].items():
      if v is not None:
        values.setdefault(row["task"], {}).setdefault(key, {}).setdefault(
            row["id"], []).append(v)
  out: dict[str, dict[str, dict[str, float]]] = {}
  for task, by_key in sorted(values.items()):
    for key, by_prompt in by_key.items():
      m = np.array([np.mean(v) for v in by_prompt.values()])
      se = float(np.std(m, ddof=1) / np.sqrt(len(m))) if len(m) > 1 else float("nan")
      out.setdefault(task, {})[key] = {"mean": float(m.mean()), "se": se, "prompts": len(m)}
  return out


def compare_rewards(config, workdir: Path) -> tuple[dict, list[str]]:
  """config.report.rewards' generate stages (the first is the start) side by side: each
  task's rewards on the same held-out prompts; with config.report.reward_models, each RM
  stage's held-out pairwise accuracy (its reward_model/norm.json)."""
  names = list(config.report.rewards)
  means = {n: reward_means(workdir / n) for n in names}
  lines = ["### Rewards on held-out prompts, by task (mean ± s.e. over prompts; "
           f"change from {names[0]})", "", "| task | reward | " + " | ".join(names) + " |",
           "|---|---|" + "---:|" * len(names)]
  rows = sorted({(task, key) for n in names for task, by_key in means[n].items()
                 for key in by_key})
  for task, key in rows:
    start = means[names[0]].get(task, {}).get(key)
    cells = []
    for n in names:
      r = means[n].get(task, {}).get(key)
      if r is None:
        cells.append("–")
        continue
      delta = "" if n == names[0] or start is None else f" ({r['mean'] - start['mean']:+.3f})"
      cells.append(f"{r['mean']:.3f} ± {r['se']:.3f}{delta}")
    lines.append(f"| {task} | {key} | " + " | ".join(cells) + " |")
  out: dict[str, Any] = {"means": means}
  rms = list(config.report.get("reward_models") or ())
  if rms:
    lines += ["", "| reward model | held-out pairwise accuracy (%) | held-out pairs |",
              "|---|---:|---:|"]
    for n in rms:
      facts = json.loads((workdir / n / "reward_model" / NORM_FILE).read_text())
      out.setdefault("reward_models", {})[n] = facts
      lines.append(f"| {n} | {100 * facts['pair_accuracy']:.1f} | {facts['responses'] // 2} |")
  return out, lines + [""]


def use_compile_cache(folder: Path) -> bool:
  """JAX's persistent compilation cache in `folder`, unless one is set already (the user's,
  or an outer pipeline's). A chain's stages compile the same programs again and again (nine
  evals of one model shape, four RL stages): from the cache, an eval stage of the miniature
  takes ~11 s instead of ~24. Entries are keyed by the program and the backend, so a stale
  one is never used for another program."""
  if jax.config.jax_compilation_cache_dir:
    return False
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  compilation_cache.reset_cache()  # takes effect even after an earlier compilation
  return True


def run(config, workdir: Path) -> dict:
  """Runs a pipeline config: config.order's stages (then compare_evals), or by default
  data → base → rl → report (experiments/tiny_zero.py)."""
  workdir = storage.absolute(workdir)
  validate(config)  # a bad later-stage value fails now, not after hours of earlier stages
  use_compile_cache(workdir / "compile_cache")
  allowed = {f.strip() for f in config.get("allow_changes", "").split(",") if f.strip()}
  summary = _run_chain(config, workdir, allowed)
  if config.get("order") or summary.get("preempted"):
    return summary
  rl_dir = workdir / "rl"
  steps = storage.glob(rl_dir / "eval", "step_*")  # the base's eval (step 0), the last
  if len(steps) < 2:
    raise FileNotFoundError(f"{rl_dir}/eval needs the step-0 and a later eval report")
  cmp, lines = _eval_table({"base": steps[0], "rl": steps[-1]}, "", "base")
  cmp.update(base_step=steps[0].name, final_step=steps[-1].name,
             rl_wall_s=summary["rl"].get("rl_wall_s"))
  if cmp["rl_wall_s"] is not None:
    lines.append(f"RL wall time (rollout + reward + update, evals excluded): "
                 f"{cmp['rl_wall_s']:.0f} s")
  _write_report(workdir, cmp, lines)
  cmp["curves"] = [str(p) for p in plot(read_metrics(rl_dir / "metrics.jsonl"), workdir / "curves")]
  summary.update(cmp)
  return summary
