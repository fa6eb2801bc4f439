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
