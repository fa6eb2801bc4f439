"""Stage dispatch: `config.stage` -> the module function that runs it (no flags defined here).

Kept apart from r1jax.main so pipelines and tests can run stages without absl flag state.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import ml_collections

# stage name -> "module:function(config, workdir)"; later stages register here.
STAGES = {
    "smoke": "r1jax.smoke:run",
    "reward_model": "r1jax.rewards.model:run",
    "sft": "r1jax.sft:run",
    "rl": "r1jax.rl:run",
    "eval": "r1jax.evaluate:run",
    "pipeline": "r1jax.pipeline:run",
}


def run(config: ml_collections.ConfigDict, workdir: str) -> object:
  """Runs `config.stage` in `workdir` (created; the resolved config is saved there)."""
  if config.stage not in STAGES:
    raise ValueError(f"unknown stage {config.stage!r}; known: {sorted(STAGES)}")
  path = Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  module, fn = STAGES[config.stage].split(":")
  return getattr(importlib.import_module(module), fn)(config, path)
