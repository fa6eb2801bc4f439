"""The one stage skeleton: resume, the step loop, checkpoints, logging, the final save.

`TrainLoop` owns the orbax manager, the SIGTERM flag and the metrics writer, so the SFT, RL
and reward-model stages only say what one step does:
  start, carry, extra = loop.start(abstract, fresh, resuming)   # restore, or build fresh
  carry, step = loop.run(carry, start, step_fn)                 # steps start + 1 … steps
  return loop.complete(state, step, save_final)                 # final output, summary.json
After each step `end_step` logs, prints the progress line, checkpoints when due (`save_due`:
by steps, by wall time, half-way, always on SIGTERM and at the last step) and says whether
to stop; `config.max_skipped_updates` non-finite updates in a row end the run
(NonFiniteError). Only a run that reached its last step (or the end of its data) unpreempted,
whose checkpoints all saved, writes its final output, and never untrained or non-finite
weights. A run that fails records why in summary.json ("failed", "exit_code").
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import jax

from r1jax.core import checkpoint as ckpt_lib
from r1jax.core import errors, multihost
from r1jax.core import metrics as metrics_lib
from r1jax.core.storage import Path

log = logging.getLogger(__name__)


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
    self._skipped_run = 0  # non-finite updates skipped in a row
    self._pace: tuple[float, int] | None = None  # (time, step) after the first step

  def __enter__(self) -> TrainLoop:
    self.preemption = ckpt_lib.Preemption().__enter__()
    self._last_save = time.monotonic()
    self.writer = metrics_lib.MetricsWriter(self.workdir, tensorboard=self.config.tensorboard)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      self.ckpt.close()
    except Exception as e:  # a failed last save: recorded like any other failure
      if exc is None:
        exc = e
        raise
      log.error("%s: closing the checkpoints after %s also failed: %s", self.stage,
                type(exc).__name__, e)
    finally:
      self.writer.close()
      self.preemption.__exit__(exc_type, exc, tb)
      if isinstance(exc, Exception):
        self.summary.pop("final", None)
        self.summary.update(failed=f"{type(exc).__name__}: {exc}"[:2000],
                            exit_code=errors.exit_code(exc))
        try:
          self.finish(self.summary.get("step", 0))
        except OSError as e:  # a full disk must not hide the error that ended the run
          log.error("%s: could not write summary.json: %s", self.stage, e)

  def start(self, abstract: Any, fresh: Callable[[], Any], resuming: bool
            ) -> tuple[int, Any, dict]:
    """(start step, carry, extra): the newest checkpoint restored straight into `abstract`'s
    shardings when `resuming` (a committed step exists), else (0, fresh(), {})."""
    if not resuming:
      return 0, fresh(), {}
    restored = self.ckpt.restore(abstract)
    if not restored:
      raise RuntimeError(f"{self.workdir}/checkpoints has step folders but none could be "
                         "restored")
    log.info("%s: resumed from step %d", self.stage, restored[0])
    self.summary["resumed_from"] = restored[0]
    return restored

  def run(self, carry: Any, start: int, step_fn: Callable[[int, Any], tuple | None]
          ) -> tuple[Any, int]:
    """Steps start + 1 … config.steps. `step_fn(step, carry)` returns (carry, metrics, extra),
    the carry being what a checkpoint holds, or None when the data ended before that step.
    Returns the last carry and the last step taken; stops early on SIGTERM."""
    step = start
    self._pace = None
    for step in range(start + 1, self.config.steps + 1):
      out = step_fn(step, carry)
      if out is None:
        return carry, step - 1
      carry, metrics, extra = out
      if self.end_step(step, metrics, carry, extra):
        break
    return carry, step

  def complete(self, state: Any, step: int, save_final: Callable[[Any], dict]) -> dict:
    """The end of a run: when it reached config.steps (or the end of its data) and was not
    preempted, refuses untrained weights, then `save_final(state)` writes the stage's output
    and returns what joins the summary. Writes summary.json and returns it either way."""
    self.summary["step"] = step
    self.ckpt.wait()  # the last save failed: no final/, no finished-looking summary
    reached = step == self.config.steps or self.summary.get("data_exhausted")
    if self.completed and reached:
      refuse_untrained(state, self.workdir)
      self.summary.update(save_final(state))
    return self.finish(step)

  def end_step(self, step: int, metrics: dict, state: Any, extra: dict) -> bool:
    """Logs step `step`, checkpoints if due; True when the loop must stop (SIGTERM)."""
    c = self.config
    self.ckpt.check()  # an earlier asynchronous save that failed stops the run here, loudly
    self.writer.write(step, metrics)
    self.last_metrics, self.summary["step"] = metrics, step
    self._check_skipped(step, int(metrics.get("skipped", 0)))
    eta = self._eta(step)
    if ((c.log_every and step % c.log_every == 0) or step == c.steps) and self.writer.active:
      print(f"[{self.stage}] " + metrics_lib.progress_line(step, metrics, c.steps, eta),
            flush=True)
    stop = multihost.any_process(self.preemption.requested)  # all save this step and stop
    saved = False
    if stop or self.save_due(step):
      saved = self.ckpt.save(step, state, extra, metrics=metrics, force=stop)
      self._last_save = time.monotonic()
    if stop:
      log.warning("%s: SIGTERM at step %d; %s, exiting", self.stage, step,
                  "checkpoint saved" if saved else "NO checkpoint (state not finite)")
      self.summary["preempted"] = True
    return stop

  def _eta(self, step: int) -> float | None:
    """Seconds left at the pace of the steps since this run's first one (which compiles),
    None until there is one."""
    now = time.monotonic()
    if self._pace is None:
      self._pace = (now, step)
      return None
    t0, s0 = self._pace
    return (now - t0) / max(step - s0, 1) * (self.config.steps - step)

  def _check_skipped(self, step: int, skipped: int) -> None:
    """Counts non-finite updates skipped in a row (a step that skipped none resets it)."""
    self._skipped_run = self._skipped_run + skipped if skipped else 0
    limit = self.config.get("max_skipped_updates", 3)
    if limit and self._skipped_run >= limit:
      raise errors.NonFiniteError(
          f"{self.stage}: {self._skipped_run} updates in a row skipped as non-finite (NaN/inf "
          f"loss, gradient or learning rate) up to step {step}; stopping (max_skipped_updates="
          f"{limit}). Check the learning rate and the data; the last checkpoint is finite.")

  def save_due(self, step: int) -> bool:
    """Whether `step` checkpoints: every `ckpt.every` steps, every `ckpt.every_minutes` of wall
    time, once half-way when the step cadence would not save before the last step, and at
    the last step. A kill therefore loses at most about that much work."""
    c, ck = self.config, self.config.ckpt
    if step == c.steps or (ck.every and step % ck.every == 0):
      return True
    if (not ck.every or ck.every >= c.steps) and step == max(1, c.steps // 2):
      return True
    minutes = ck.get("every_minutes", 0.0)
    # Wall time differs between hosts: all save (a collective) if any one is due.
    return bool(minutes) and multihost.any_process(
        time.monotonic() - self._last_save >= 60.0 * minutes)

  def finish(self, step: int) -> dict:
    """Writes summary.json (last step's metrics included, and each held-out curve's worst
    mid-run drop: `metrics.worst_drops`) and returns it."""
    self.summary["step"] = step
    self.summary.update(self.last_metrics)
    self.writer.sync()
    if self.writer.active and self.writer.path.exists():
      drops = metrics_lib.worst_drops(metrics_lib.read_metrics(self.writer.path))
      if drops:
        self.summary["eval_worst_drop"] = drops
    (self.workdir / "summary.json").write_text(
        json.dumps(self.summary, indent=2, default=float))
    return self.summary

  @property
  def completed(self) -> bool:
    """The run reached config.steps (not preempted)."""
    return not self.summary.get("preempted")


def refuse_untrained(state: Any, workdir: Path) -> None:
  """A stage never writes final/ (the next stage's starting point) without one update applied,
  or from weights that are not finite."""
  if int(jax.device_get(state.step)) == 0:
    raise RuntimeError(f"{workdir}: no optimizer update was applied (no usable data, or every "
                       "update skipped as non-finite); refusing to write final/ untrained weights")
  if not ckpt_lib.all_finite(state.params):
    raise errors.NonFiniteError(f"{workdir}: the final weights hold NaN/inf; final/ not written")
