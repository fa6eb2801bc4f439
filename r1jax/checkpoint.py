"""Orbax checkpoints of r1jax params, with the ModelConfig stored beside them.

A params checkpoint is a folder holding `model.json` (the ModelConfig) and
`params/` (an orbax PyTree checkpoint). It is restored straight into the
target sharding. Every stored shape is checked against the config first, so a
mismatched checkpoint fails with the names of the bad params.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from r1jax import model as model_lib
from r1jax import sharding as sharding_lib
from r1jax.config import model_config


def save_params(path: str | Path, params: Any, cfg, kind: str | None = None) -> Path:
  """Writes `path/model.json` (+ `kind`, e.g. reward_model) and `path/params/`, blocking."""
  path = Path(path).absolute()
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
    shardings = jax.tree.map(lambda _: single, abstract)
  else:
    shardings = sharding_lib.tree_shardings(model_lib.param_axes(cfg), abstract, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def load_params(path: str | Path, mesh: Mesh | None = None, **overrides):
  """(ModelConfig, params) from a `save_params` folder, restored into `mesh`'s sharding."""
  path = Path(path).absolute()
  if not (path / "model.json").exists() or not (path / "params").exists():
    raise FileNotFoundError(f"{path} is not an r1jax params checkpoint "
                            "(expected model.json and params/)")
  meta = json.loads((path / "model.json").read_text())
  if meta.get("kind"):
    raise ValueError(f"{path} holds a {meta['kind']} checkpoint, not policy params")
  cfg = model_config(meta).replace(**overrides)
  target = abstract_params(cfg, mesh)
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(path / "params")
    stored = getattr(stored, "item_metadata", stored)
    _check_shapes(stored, target)
    return cfg, ckptr.restore(path / "params", target)


def load_model(group, mesh: Mesh, seed: int = 0, abstract: bool = False):
  """(ModelConfig, params) for a config's `model` group, sharded on `mesh`.

  In order of precedence: `init_from` (an r1jax params checkpoint, e.g. the
  SFT'd base), `hf_dir` (an HF folder), else a random init of the group's shape.
  The group's dtypes and remat policy apply in every case. `abstract=True` reads
  only the shape (ShapeDtypeStructs with target shardings): a run about to
  restore its own checkpoint never loads weights it would throw away.
  """
  numerics = dict(param_dtype=group.param_dtype, compute_dtype=group.compute_dtype,
                  remat=group.remat)
  if abstract:
    if group.get("init_from"):
      path = Path(group.init_from).absolute()
      if not (path / "model.json").exists():
        raise FileNotFoundError(f"{path} is not an r1jax params checkpoint (no model.json)")
      cfg = model_config(json.loads((path / "model.json").read_text())).replace(**numerics)
      _check_shape(cfg, model_config(group), group.init_from)
    elif group.hf_dir:
      from r1jax import hf
      config_json = Path(group.hf_dir) / "config.json"
      if not config_json.exists():
        raise FileNotFoundError(f"no config.json in {group.hf_dir}")
      cfg = hf.config_from_hf(json.loads(config_json.read_text()), **numerics)
    else:
      cfg = model_config(group)
    return cfg, abstract_params(cfg, mesh)
  if group.get("init_from"):
    cfg, params = load_params(group.init_from, mesh, **numerics)
    _check_shape(cfg, model_config(group), group.init_from)
    return cfg, params
  if group.hf_dir:
    from r1jax import hf
    return hf.load_pretrained(group.hf_dir, mesh=mesh, **numerics)
  cfg = model_config(group)
  key = jax.random.key(seed)
  params = sharding_lib.init_sharded(lambda: model_lib.init_params(cfg, key),
                                     model_lib.param_axes(cfg), mesh)
  return cfg, params


_SHAPE_FIELDS = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "mlp_dim",
                 "qkv_bias", "out_bias", "tie_embeddings")


def _check_shape(stored_cfg, wanted_cfg, path) -> None:
  """The checkpoint's model must be the one the config describes (shape, not numerics)."""
  diff = [f"{f}: checkpoint {getattr(stored_cfg, f)}, config {getattr(wanted_cfg, f)}"
          for f in _SHAPE_FIELDS if getattr(stored_cfg, f) != getattr(wanted_cfg, f)]
  if diff:
    raise ValueError(f"model.init_from={path} has another model shape than config.model: "
                     + "; ".join(diff))


def _check_shapes(stored: Any, target: Any) -> None:
  got = {k: tuple(v.shape) for k, v in model_lib.flatten(_as_dict(stored)).items()}
  want = {k: tuple(v.shape) for k, v in model_lib.flatten(target).items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: stored {got[k]}, config implies {want[k]}"
               for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    raise ValueError("checkpoint does not match model.json: " + "; ".join(problems[:10]))


def _as_dict(tree: Any) -> Any:
  if hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


# ------------------------------------------------------------------ train checkpoints


def has_checkpoint(directory: str | Path) -> bool:
  """Whether a CheckpointManager directory holds a committed step (temp dirs do not count)."""
  directory = Path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def abstract_like(abstract: Any, shardings: Any, dtype: Any = None) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings` (and `dtype` for float leaves)."""
  def one(a, s):
    dt = dtype if dtype is not None and jax.numpy.issubdtype(a.dtype, jax.numpy.floating) \
        else a.dtype
    return jax.ShapeDtypeStruct(a.shape, dt, sharding=s)
  return jax.tree.map(one, abstract, shardings)


class Preemption:
  """Turns SIGTERM (TPU VM preemption, `kill`) into a flag the loop polls between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    import signal
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    import signal
    signal.signal(signal.SIGTERM, self._previous)


def _all_finite(tree: Any) -> bool:
  import jax.numpy as jnp
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(all(jnp.all(jnp.isfinite(x)) for x in leaves))


class TrainCheckpointer:
  """Orbax CheckpointManager for a loop: a state pytree plus JSON extras (data iterator).

  Saves are asynchronous and keep the newest `keep` (and, with `best_metric`,
  the best) steps. A state holding NaN/inf is never written: the save is
  refused and logged, so a resume always starts from finite weights.
  """

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
               best_metric: str | None = None, best_mode: str = "max"):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode, keep_checkpoints_without_metrics=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.best_metric = best_metric

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, extra: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `step` (returns False, writing nothing, if `state` is not finite)."""
    if not _all_finite(state):
      import logging
      logging.getLogger(__name__).error(
          "step %d: state holds NaN/inf; checkpoint NOT written", step)
      return False
    if not self.best_metric or not metrics or self.best_metric not in metrics:
      metrics = None
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
        metrics=metrics, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of `step` (default: latest), laid out like `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        abstract_state)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    except ValueError as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match this run's "
                       f"model/optimizer shapes: {e}") from None
    return step, out["state"], out["extra"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
