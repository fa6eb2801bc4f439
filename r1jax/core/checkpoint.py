"""Orbax checkpoints of r1jax params, with the ModelConfig stored beside them.

A params checkpoint is a folder holding `model.json` (the ModelConfig) and
`params/` (an orbax PyTree checkpoint). It is restored straight into the
target sharding. Every stored shape is checked against the config first, so a
mismatched checkpoint fails with the names of the bad params.
"""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from r1jax.core import errors
from r1jax.core import model as model_lib
from r1jax.core import sharding as sharding_lib
from r1jax.core import storage
from r1jax.core.config import model_config
from r1jax.core.storage import Path

log = logging.getLogger(__name__)


def save_params(path: str | Path, params: Any, cfg, kind: str | None = None) -> Path:
  """Writes `path/model.json` (+ `kind`, e.g. reward_model) and `path/params/`, blocking."""
  path = storage.absolute(path)
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    meta = {**cfg.to_dict(), **({"kind": kind} if kind else {})}
    (path / "model.json").write_text(json.dumps(meta, indent=2))
  return path


def abstract_params(cfg, mesh: Mesh | None) -> Any:
  """ShapeDtypeStructs of the params, each carrying its target sharding."""
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  if mesh is None:
    single = SingleDeviceSharding(jax.devices()[0])
    return abstract_like(abstract, jax.tree.map(lambda _: single, abstract))
  return abstract_like(abstract,
                       sharding_lib.tree_shardings(model_lib.param_axes(cfg), abstract, mesh))


def load_params(path: str | Path, mesh: Mesh | None = None, *, kind: str | None = None,
                target=None, abstract: bool = False, **overrides):
  """(ModelConfig, params) from a `save_params` folder of `kind` (None: policy params),
  restored into `target(cfg)` (default: the policy's shardings on `mesh`); with `abstract`,
  the target only. Stored shapes are checked against it before any array is read."""
  path = storage.absolute(path)
  if not (path / "model.json").exists() or not (path / "params").exists():
    raise FileNotFoundError(f"{path} is not an r1jax params checkpoint "
                            "(expected model.json and params/)")
  meta = json.loads((path / "model.json").read_text())
  stored_kind = meta.pop("kind", None)
  if stored_kind != kind:
    wanted = "a reward model" if kind == "reward_model" else f"{kind or 'policy'} params"
    raise ValueError(f"{path} holds a {stored_kind or 'policy'} checkpoint, not {wanted}")
  cfg = model_config(meta).replace(**overrides)
  shapes = target(cfg) if target else abstract_params(cfg, mesh)
  if abstract:
    return cfg, shapes
  mismatch, problem = _stored_mismatch(path / "params", shapes)
  if mismatch:
    raise ValueError(f"checkpoint does not match model.json: {mismatch}")
  if problem:
    raise ValueError(f"{path}/params: {problem}")
  with ocp.StandardCheckpointer() as ckptr:
    return cfg, ckptr.restore(path / "params", shapes)


def _shape_problems(got: dict, want: dict) -> list[str]:
  """What differs between stored {path: shape} and wanted {path: shape}, path by path."""
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  return problems + [f"{k}: stored {got[k]}, run has {want[k]}"
                     for k in sorted(set(got) & set(want)) if got[k] != want[k]]


# ------------------------------------------------------------------ train checkpoints


def has_checkpoint(directory: str | Path) -> bool:
  """Whether a CheckpointManager directory holds a committed step (temp dirs do not count)."""
  directory = Path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def abstract_like(abstract: Any, shardings: Any, dtype: Any = None) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings` (and `dtype` for float leaves)."""
  def one(a, s):
    dt = dtype if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) \
        else a.dtype
    return jax.ShapeDtypeStruct(a.shape, dt, sharding=s)
  return jax.tree.map(one, abstract, shardings)


class Preemption:
  """Turns SIGTERM (TPU VM preemption, `kill`) into a flag the loop polls between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def all_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(all(jnp.all(jnp.isfinite(x)) for x in leaves))


# Files every committed step holds, each a JSON object, and the file list r1jax adds once a
# save has finished.
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "extra/metadata")
FILE_LIST = "r1jax_files.json"
SET_ASIDE = "checkpoints_set_aside"  # beside the checkpoints folder: damaged steps, kept


def step_problem(step_dir: Path) -> str | None:
  """Why a committed step folder cannot be restored, or None if it looks whole.

  Checks that the folder holds files, that orbax's metadata and our JSON extras exist and
  parse, and that every file the save wrote (FILE_LIST, written once the save finished) is
  still there with its size: a truncated or deleted array file is caught before orbax reads it.
  """
  if not step_dir.is_dir() or not any(step_dir.iterdir()):
    return "empty step folder"
  for rel in _REQUIRED:
    if not (step_dir / rel).is_file():
      return f"{rel} is missing"
  for rel in _REQUIRED + ((FILE_LIST,) if (step_dir / FILE_LIST).is_file() else ()):
    try:
      value = json.loads((step_dir / rel).read_text())
    except ValueError as e:
      return f"{rel} does not parse ({e})"
    if not isinstance(value, dict):
      return f"{rel} holds a JSON {type(value).__name__}, not an object"
  if (step_dir / FILE_LIST).is_file():
    for rel, size in json.loads((step_dir / FILE_LIST).read_text()).items():
      path = step_dir / rel
      if not path.is_file():
        return f"{rel} is missing"
      if storage.size(path) != size:
        return f"{rel} has {storage.size(path)} bytes; the save wrote {size}"
  return None


def _file_sizes(step_dir: Path) -> dict[str, int]:
  return {str(p.relative_to(step_dir)): storage.size(p) for p in storage.files_under(step_dir)
          if p.name != FILE_LIST}


# orbax's messages when the run's state has other shapes or another structure than the
# stored one: a configuration change (e.g. another model, β > 0 adding a reference), which
# must be reported as such, never "repaired" by moving good checkpoints aside.
_CONFIG_MISMATCH = ("not compatible with the stored shape", "tree structures do not match",
                    "Structure mismatch")


def _is_config_mismatch(error: Exception) -> bool:
  return isinstance(error, ValueError) and any(m in str(error) for m in _CONFIG_MISMATCH)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves if hasattr(v, "shape")}


def _stored_mismatch(state_dir: Path, target: Any) -> tuple[str | None, str | None]:
  """(how the stored state's arrays differ from `target`'s, why its metadata is unreadable).

  Checked before orbax reads any array: orbax finds a mismatch only midway through its
  asynchronous reads, and the reads it then abandons surface later as unraisable errors
  ("Event loop is closed", "coroutine … was never awaited").
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(state_dir)
  except Exception as e:  # pylint: disable=broad-except  (damaged: the caller sets it aside)
    return None, f"orbax could not read its metadata: {type(e).__name__}: {str(e)[:300]}"
  got = _shapes_by_path(getattr(getattr(meta, "item_metadata", meta), "tree", meta))
  want = _shapes_by_path(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
  return ("; ".join(_shape_problems(got, want)[:10]) or None), None


class TrainCheckpointer:
  """Orbax CheckpointManager for a loop: a state pytree plus JSON extras (data iterator).

  Saves are asynchronous and keep the newest `keep` (and, with `best_metric`,
  the best) steps. A state holding NaN/inf is never written (NonFiniteError), so a resume
  always starts from finite weights; a failed save raises SaveFailed. Damaged steps are set
  aside before orbax's manager reads the folder (it parses every step's metadata).
  """

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
               best_metric: str | None = None, best_mode: str = "max"):
    self.directory = storage.absolute(directory)
    self._set_aside_damaged()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode, keep_checkpoints_without_metrics=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.best_metric = best_metric
    self._unlisted: list[int] = []  # saved steps whose file list is not written yet

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, extra: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `step`; NonFiniteError, writing nothing, if `state` is not finite."""
    if not all_finite(state):
      raise errors.NonFiniteError(f"step {step}: the train state holds NaN/inf; checkpoint "
                                  f"not written (the newest in {self.directory} is finite)")
    if not self.best_metric or not metrics or self.best_metric not in metrics:
      metrics = None
    self.check()
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
          metrics=metrics, force=force)
    except Exception as e:  # the synchronous part of a save: same loud error as the async one
      raise errors.SaveFailed(f"saving a checkpoint to {self.directory} failed: "
                              f"{type(e).__name__}: {e}") from e
    if saved:
      self._unlisted.append(step)
    return saved

  def check(self) -> None:
    """Raises if an earlier asynchronous save failed (with its cause); lists finished saves.

    A failed save never replaces a good step (orbax commits by renaming a finished temp
    folder), so the run stops here and a re-run resumes from the last good step.
    """
    try:
      self.manager.check_for_errors()
    except Exception as e:  # orbax re-raises the writer thread's error, whatever its type
      raise errors.SaveFailed(f"saving a checkpoint to {self.directory} failed: "
                              f"{type(e).__name__}: {e}") from e
    if self._unlisted and not self.manager.is_saving_in_progress():
      self._write_file_lists()

  def _write_file_lists(self) -> None:
    """Each finished step's file sizes, written atomically (a failed write leaves none)."""
    steps, self._unlisted = self._unlisted, []
    for step in steps:
      step_dir = self.directory / str(step)
      if jax.process_index() != 0 or not step_dir.is_dir():
        continue
      try:
        storage.write_atomic(step_dir / FILE_LIST, json.dumps(_file_sizes(step_dir)))
      except OSError as e:
        (step_dir / (FILE_LIST + ".tmp")).unlink(missing_ok=True)
        raise errors.SaveFailed(f"saving a checkpoint to {self.directory} failed: writing "
                                f"the file list of step {step}: {e}") from e

  def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of the newest step that restores, laid out like `abstract_state`.

    A damaged step (`step_problem`'s, set aside when the manager was made, or one orbax fails
    to read) is logged and moved aside to SET_ASIDE (never deleted), and the previous kept
    step is tried. A step whose arrays
    have other shapes or structure than the run's is a configuration error: it raises at once
    and moves nothing. None for
    a fresh run; RuntimeError listing each step's reason when no step restores.
    """
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        abstract_state)
    reasons = list(self._damaged)
    for step in sorted(self.manager.all_steps(), reverse=True):
      mismatch, problem = _stored_mismatch(self.directory / str(step) / "state", target)
      if mismatch:
        raise ValueError(f"checkpoint {self.directory}/{step} does not match this run's "
                         f"model/optimizer shapes or state structure: {mismatch}")
      if problem is None:
        try:
          out = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
          return step, out["state"], out["extra"]
        except Exception as e:  # pylint: disable=broad-except  (any read error: damaged)
          if _is_config_mismatch(e):
            raise ValueError(f"checkpoint {self.directory}/{step} does not match this run's "
                             f"model/optimizer shapes or state structure: {e}") from None
          problem = f"orbax could not read it: {type(e).__name__}: {str(e)[:300]}"
      reasons.append(f"step {step}: {problem}")
      self._set_aside(step, problem)
    if reasons:
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored (each was moved "
                         f"to {self.directory.parent / SET_ASIDE}): " + "; ".join(reasons))
    return None

  def _set_aside_damaged(self) -> None:
    """Every committed step `step_problem` finds damaged, set aside (newest first) before
    orbax's manager parses the folder; `restore` reports them if no step restores."""
    self._damaged: list[str] = []
    steps = sorted((int(p.name) for p in storage.glob(self.directory, "*") if p.name.isdigit()),
                   reverse=True)
    for step in steps:
      problem = step_problem(self.directory / str(step))
      if problem:
        self._damaged.append(f"step {step}: {problem}")
        self._set_aside(step, problem, reload=False)

  def _set_aside(self, step: int, problem: str, reload: bool = True) -> None:
    """Moves a damaged step out of the manager's sight, with the reason beside it."""
    log.error("checkpoint %s/%d is damaged (%s): moved aside; trying the previous step",
              self.directory, step, problem)
    if jax.process_index() == 0:
      aside = self.directory.parent / SET_ASIDE
      aside.mkdir(exist_ok=True)
      dest = aside / str(step)
      n = 1
      while dest.exists():
        dest, n = aside / f"{step}.{n}", n + 1
      storage.move(self.directory / str(step), dest)
      (aside / f"{dest.name}.reason.txt").write_text(problem + "\n")
    if reload:
      self.manager.reload()

  def wait(self) -> None:
    """Blocks until pending saves are written, then raises if one failed."""
    self.manager.wait_until_finished()
    self.check()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
