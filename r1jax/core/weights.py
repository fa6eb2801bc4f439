"""Where a stage's model weights come from: a random init, an r1jax checkpoint, or an HF folder.

`load_model(config.model, mesh)` is the one place that reads a config's `model` group and
decides: `init_from` (an r1jax params checkpoint, e.g. the SFT'd base) wins over `hf_dir` (an
HF folder), else the group's shape is initialised at random. Everything comes back sharded on
the mesh; `abstract=True` returns only the shapes, for a run about to restore its own checkpoint.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from r1jax.core import checkpoint
from r1jax.core import model as model_lib
from r1jax.core.config import ModelConfig, model_config

def _hf():
  """The HF io module (optional extra 'r1jax[hf]': safetensors), imported only when used."""
  from r1jax.core import hf  # pylint: disable=g-import-not-at-top
  return hf


def load_model(group, mesh: Mesh, seed: int = 0, abstract: bool = False):
  """(ModelConfig, params) for a config's `model` group, sharded on `mesh`.

  In order of precedence: `init_from` (an r1jax params checkpoint, e.g. the
  SFT'd base), `hf_dir` (an HF folder), else a random init of the group's shape.
  The group's dtypes, remat policy and attention (kernel, query blocks) apply in every
  case. `abstract=True` reads only the shape (ShapeDtypeStructs with target shardings): a
  run about to restore its own checkpoint never loads weights it would throw away.
  """
  numerics = dict(param_dtype=group.param_dtype, compute_dtype=group.compute_dtype,
                  remat=group.remat, attention=group.get("attention", "auto"),
                  attention_block=group.get("attention_block", ModelConfig.attention_block))
  if group.get("init_from"):
    cfg, params = checkpoint.load_params(group.init_from, mesh, abstract=abstract, **numerics)
    _check_shape(cfg, model_config(group), group.init_from)
    return cfg, params
  if group.hf_dir:
    return _hf().load_pretrained(group.hf_dir, mesh=mesh, abstract=abstract, **numerics)
  cfg = model_config(group)
  target = checkpoint.abstract_params(cfg, mesh)
  if abstract:
    return cfg, target
  init = jax.jit(lambda: model_lib.init_params(cfg, jax.random.key(seed)),
                 out_shardings=jax.tree.map(lambda a: a.sharding, target))
  return cfg, init()


_SHAPE_FIELDS = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "mlp_dim",
                 "qkv_bias", "out_bias", "tie_embeddings")


def _check_shape(stored_cfg, wanted_cfg, path) -> None:
  """The checkpoint's model must be the one the config describes (shape, not numerics)."""
  diff = [f"{f}: checkpoint {getattr(stored_cfg, f)}, config {getattr(wanted_cfg, f)}"
          for f in _SHAPE_FIELDS if getattr(stored_cfg, f) != getattr(wanted_cfg, f)]
  if diff:
    raise ValueError(f"model.init_from={path} has another model shape than config.model: "
                     + "; ".join(diff))


def check_vocab(tokenizer, cfg: ModelConfig) -> None:
  """A tokenizer whose ids the embedding cannot hold fails before any work."""
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {cfg.vocab_size}")
