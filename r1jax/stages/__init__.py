"""The stages of the R1 recipe, one file each, and the registry `r1jax.main` dispatches on.

A stage is a module with `run(config, workdir) -> dict` (its summary) and, optionally,
`validate(config)` (checks without running). Adding one means one new file here and one line
in STAGES. Kept apart from r1jax.main so pipelines and tests can
run stages without absl flag state. Stages compose the layers below them; nothing below
imports a stage.
"""

from __future__ import annotations

import importlib

import jax
import ml_collections

from r1jax.core.config import non_finite_fields
from r1jax.core.errors import ConfigError, WorkdirLock
from r1jax.core.storage import Path

# stage name -> "module:function(config, workdir)". Imported when run, so a config for one
# stage never loads the others.
STAGES = {
    "smoke": "r1jax.stages.smoke:run",
    "sft": "r1jax.stages.sft:run",
    "rl": "r1jax.stages.rl:run",
    "reward_model": "r1jax.stages.reward_model:run",
    "eval": "r1jax.stages.eval:run",
    "generate": "r1jax.stages.generate:run",
    "pipeline": "r1jax.stages.pipeline:run",
}


def run(config: ml_collections.ConfigDict, workdir: str) -> object:
  """Runs `config.stage` in `workdir` (created; the resolved config is saved there).

  The config is checked first (a ConfigError, before anything is written), then the workdir is
  locked for this run: a second run on it is refused at once (WorkdirLocked)."""
  bad = non_finite_fields(config)
  if bad:
    raise ConfigError(f"config: {', '.join(bad)} must be finite numbers, not NaN or inf")
  try:
    validate(config)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config: {e}") from e
  path = Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  module, fn = STAGES[config.stage].split(":")
  module = importlib.import_module(module)
  with WorkdirLock(path, jax.process_index()):
    if not getattr(module, "RECORDS_OWN_CONFIG", False):  # a pipeline checks reruns first
      record_config(config, path)
    return getattr(module, fn)(config, path)


def record_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """WORKDIR/config.json: the resolved config a stage ran with (process 0 writes it)."""
  if jax.process_index() == 0:
    (Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a stage config without running it (types, enums, names), where the stage can.

  A stage module may define `validate(config)`; pipelines call this for every stage first.
  """
  if config.stage not in STAGES:
    raise ValueError(f"unknown stage {config.stage!r}; known: {sorted(STAGES)}")
  module = importlib.import_module(STAGES[config.stage].split(":")[0])
  if hasattr(module, "validate"):
    module.validate(config)
