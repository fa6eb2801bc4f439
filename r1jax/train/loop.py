"""What every training loop shares: resume, periodic / preemption checkpoints, logging, summary.

`TrainLoop` owns the orbax manager, the SIGTERM flag and the metrics writer, so the SFT, RL and
reward-model loops only say what one step does. Per step the loop calls `end_step(step, metrics, state,
extra)`, which logs, prints the progress line, checkpoints when due (always on SIGTERM and at
the last step) and tells the caller whether to stop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from r1jax.core import checkpoint as ckpt_lib
from r1jax.core import metrics as metrics_lib

log = logging.getLogger(__name__)


def _any_host(flag: bool) -> bool:
  """True on every host if any host got SIGTERM, so all of them save the same step and stop."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class TrainLoop:
  """Context manager around a loop of `config.steps` steps in `workdir`."""

  def __init__(self, config, workdir: Path, stage: str):
    self.config, self.workdir, self.stage = config, Path(workdir), stage
    ck = config.ckpt
    self.ckpt = ckpt_lib.TrainCheckpointer(self.workdir / "checkpoints", keep=ck.keep,
                                           async_save=ck.async_save,
                                           best_metric=ck.get("best_metric") or None,
                                           best_mode=ck.get("best_mode", "max"))
    self.summary: dict[str, Any] = {"stage": stage}
    self.last_metrics: dict[str, float] = {}
    self.timer = metrics_lib.StepTimer()

  def __enter__(self) -> TrainLoop:
    self.preemption = ckpt_lib.Preemption().__enter__()
    self.writer = metrics_lib.MetricsWriter(self.workdir, tensorboard=self.config.tensorboard)
    return self

  def __exit__(self, *exc) -> None:
    try:
      self.ckpt.close()
    finally:
      self.writer.close()
      self.preemption.__exit__(*exc)

  def resume(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of the newest checkpoint, or None for a fresh run."""
    restored = self.ckpt.restore(abstract_state)
    if restored:
      log.info("%s: resumed from step %d", self.stage, restored[0])
      self.summary["resumed_from"] = restored[0]
    return restored

  def end_step(self, step: int, metrics: dict, state: Any, extra: dict) -> bool:
    """Logs step `step`, checkpoints if due; True when the loop must stop (SIGTERM)."""
    c = self.config
    self.writer.write(step, metrics)
    self.last_metrics = metrics
    if (c.log_every and step % c.log_every == 0) or step == c.steps:
      print(f"[{self.stage}] " + metrics_lib.progress_line(step, metrics), flush=True)
    stop = _any_host(self.preemption.requested)
    saved = False
    if stop or (c.ckpt.every and step % c.ckpt.every == 0) or step == c.steps:
      saved = self.ckpt.save(step, state, extra, metrics=metrics, force=stop)
    if stop:
      log.warning("%s: SIGTERM at step %d; %s, exiting", self.stage, step,
                  "checkpoint saved" if saved else "NO checkpoint (state not finite)")
      self.summary["preempted"] = True
    return stop

  def finish(self, step: int) -> dict:
    """Writes summary.json (last step's metrics included) and returns it."""
    self.summary["step"] = step
    self.summary.update(self.last_metrics)
    (self.workdir / "summary.json").write_text(
        json.dumps(self.summary, indent=2, default=float))
    return self.summary

  @property
  def completed(self) -> bool:
    """The run reached config.steps (not preempted)."""
    return not self.summary.get("preempted")
