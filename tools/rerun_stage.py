"""Re-runs one stage of a pipeline experiment on a finished pipeline's outputs, elsewhere.

  python tools/rerun_stage.py --config=experiments/tiny_zero.py --stage=rl \\
      --from_workdir=/tmp/tz --workdir=/tmp/tz_rl_again [--cpu_devices=1]

The stage config is the pipeline's, with `{workdir}` resolved against --from_workdir, so it
reads that run's data and checkpoints (tiny_zero's base, say) and writes only into
--workdir. For A/B runs of one stage (a layout, a flag) without redoing the stages before
it. Overrides: --config.<stage>.<field>=value, as for `python -m r1jax.main`.
"""

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from bench_common import cpu_devices_flag, use_cpu_devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "A pipeline experiment file.")
_STAGE = flags.DEFINE_string("stage", None, "The stage (a key of the pipeline config).")
_FROM = flags.DEFINE_string("from_workdir", None, "The finished pipeline's working directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where this run of the stage goes.")
_CPU_DEVICES = cpu_devices_flag()
flags.mark_flags_as_required(["config", "stage", "from_workdir", "workdir"])


def main(argv):
  del argv
  use_cpu_devices(_CPU_DEVICES.value)
  import jax
  from r1jax import stages
  from r1jax.stages import pipeline

  config = _CONFIG.value
  if _STAGE.value not in config or "stage" not in config[_STAGE.value]:
    raise app.UsageError(f"{_STAGE.value!r} is not a stage of {config.get('stage')} config")
  stage = pipeline.resolve(config[_STAGE.value], Path(_FROM.value).absolute())
  summary = stages.run(stage, _WORKDIR.value) or {}
  print(json.dumps({"devices": jax.device_count(), **{k: summary.get(k) for k in (
      "stage", "step", "rl_wall_s")}}, default=str))


if __name__ == "__main__":
  app.run(main)
