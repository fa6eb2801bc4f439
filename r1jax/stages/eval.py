"""The `eval` stage: k samples per question on each of config.eval.benchmarks, reported.

Loads the model (random / init_from / HF, core/weights.py), runs the evaluation suite with a
per-benchmark key, and writes WORKDIR/eval/<benchmark>.json, .completions.jsonl and report.md.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from r1jax.core import sharding
from r1jax.core.config import eval_group, stage_group
from r1jax.core.storage import Path
from r1jax.core.tokenizer import load_tokenizer, tokenizer_path
from r1jax.core.weights import load_model
from r1jax.evaluation import suite as suite_lib
from r1jax.evaluation.report import markdown_table
from r1jax.generation.sampler import stop_token_ids
from r1jax.rewards import pool as pool_lib


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` stage's config: a model and an `eval` group."""
  c = stage_group("eval", 0)
  c.eval = eval_group()
  return c


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Samples and grades config.eval.benchmarks with config.model."""
  e = config.eval
  if not str(e.benchmarks).strip():
    raise ValueError(f"config.eval.benchmarks={e.benchmarks!r} must name files with distinct "
                     "names (none given)")
  # Everything that can fail on bad input fails here, before the model is loaded.
  tok = load_tokenizer(tokenizer_path(config))
  stop_token_ids(tok, e.stop)
  sets = suite_lib.load_sets(e, config.max_bad_share)
  mesh = sharding.make_mesh(config.mesh.shape)
  cfg, params = load_model(config.model, mesh, seed=config.seed)
  suite = suite_lib.make_suite(e, cfg, mesh, tok, sets)
  out_dir, lead = Path(workdir) / "eval", jax.process_index() == 0
  with pool_lib.RewardPool(num_workers=min(4, os.cpu_count() or 1)) as pool:
    reports = suite.run(params, lambda name: suite_lib.benchmark_key(config.seed, name), pool,
                        out_dir, progress=lead, settings={"seed": config.seed})
  table = markdown_table(reports)
  if lead:
    (out_dir / "report.md").write_text(table)
    print(table, flush=True)
  return {"stage": "eval", **suite_lib.metrics(reports)}
