"""Entry point: `python -m r1jax.main --config=experiments/NAME.py[:arg] --workdir=DIR`.

Parses the (locked) experiment config with absl's config_flags, so
`--config.grpo.beta=0.0` overrides a field and a typo fails before any work.
On multi-host TPU / GPU slices pass `--distributed` to initialise
`jax.distributed` first; on a CPU-only machine `--cpu_devices=N` gives the
mesh one device per core. Then it dispatches on `config.stage`.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from r1jax.stages import STAGES, run  # noqa: F401  (STAGES: re-exported)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file: experiments/NAME.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, checkpoints and logs go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0,
    "CPU runs: expose this many CPU devices (e.g. one per core) so the mesh's batch axes put "
    "rows on every core; XLA:CPU runs one device's small decode matmuls on about one core. "
    "0 keeps JAX's default. No effect on GPU/TPU.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
