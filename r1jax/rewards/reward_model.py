"""Scalar reward models on the r1jax decoder, trained on preference pairs (Bradley–Terry).

R1's all-scenario RL scores helpfulness on the summary after </think> and
safety on the whole response with such models. A reward model is the policy's
decoder plus a linear head on the final hidden state of the last real token:
r = h_last · w + b. The `reward_model` stage (stages/reward_model.py) trains it
on (prompt, chosen, rejected) rows with the policy's shared update step, mesh and
logical-axis shardings. `RewardModel` plugs a trained model into the reward
registry as a "batch" reward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, PartitionSpec as P

from r1jax.core import checkpoint
from r1jax.core import model as model_lib
from r1jax.core import sharding as sharding_lib
from r1jax.core.config import ModelConfig, model_config
from r1jax.data.preferences import encode_pairs
from r1jax.rewards import registry


def head_axes() -> dict[str, P]:
  return {"w": P("embed"), "b": P()}


def rm_axes(cfg: ModelConfig) -> dict[str, Any]:
  """Logical axes of {backbone, head}: the backbone sharded exactly like a policy."""
  return {"backbone": model_lib.param_axes(cfg), "head": head_axes()}


def init_rm(cfg: ModelConfig, key: jax.Array, backbone: model_lib.Params | None = None):
  """RM params; the head starts at zero so initial rewards are 0 (no prior preference)."""
  if backbone is None:
    backbone = model_lib.init_params(cfg, key)
  dtype = jnp.dtype(cfg.param_dtype)
  return {"backbone": backbone,
          "head": {"w": jnp.zeros((cfg.hidden,), dtype), "b": jnp.zeros((), dtype)}}


def score(params, tokens_NxT: jax.Array, mask_NxT: jax.Array, cfg: ModelConfig) -> jax.Array:
  """f32 rewards (N,) read at each row's last real token (left or right padding)."""
  h_NxTxD, _ = model_lib.hidden_states(params["backbone"], tokens_NxT, cfg, mask_BxT=mask_NxT)
  t = tokens_NxT.shape[1]
  last_N = (t - 1) - jnp.argmax(mask_NxT[:, ::-1], axis=1)
  h_NxD = jnp.take_along_axis(h_NxTxD, last_N[:, None, None], axis=1)[:, 0]
  w_D = params["head"]["w"].astype(jnp.float32)
  return h_NxD.astype(jnp.float32) @ w_D + params["head"]["b"].astype(jnp.float32)


def bradley_terry(r_chosen_B: jax.Array, r_rejected_B: jax.Array):
  """(mean −log σ(r_c − r_r), metrics): the pairwise preference loss."""
  margin_B = r_chosen_B - r_rejected_B
  loss = jnp.mean(jax.nn.softplus(-margin_B))  # = −log σ(margin), stable for large |margin|
  return loss, {"rm/loss": loss, "rm/accuracy": jnp.mean(margin_B > 0),
                "rm/margin": jnp.mean(margin_B)}


def save_rm(path: str | Path, params, cfg: ModelConfig) -> Path:
  """Writes `path/model.json` (with kind=reward_model) and `path/params/` (orbax)."""
  return checkpoint.save_params(path, params, cfg, kind="reward_model")


def load_rm(path: str | Path, mesh: Mesh | None = None):
  """(ModelConfig, params) of a saved reward model, restored into `mesh`'s shardings."""
  path = Path(path).absolute()
  meta_path = path / "model.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{path} is not a reward-model checkpoint (no model.json)")
  meta = json.loads(meta_path.read_text())
  if meta.pop("kind", None) != "reward_model":
    raise ValueError(f"{path} holds a policy, not a reward model (model.json has no "
                     "kind=reward_model)")
  cfg = model_config(meta)
  mesh = mesh or sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  abstract = jax.eval_shape(lambda: init_rm(cfg, jax.random.key(0)))
  shardings = sharding_lib.tree_shardings(rm_axes(cfg), abstract, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    return cfg, ckptr.restore(path / "params", target)


# ------------------------------------------------------------------------- scoring


class RewardModel:
  """A trained RM as a batch reward: fn(texts, prompt=[...]) -> list[float]."""

  def __init__(self, params, cfg: ModelConfig, tokenizer, *, template: str = "chatml",
               max_len: int = 512, batch_size: int = 32, scale: float = 1.0):
    self.params, self.cfg, self.tok = params, cfg, tokenizer
    self.template, self.max_len, self.batch_size, self.scale = template, max_len, batch_size, scale
    self._score = jax.jit(lambda p, t, m: score(p, t, m, cfg))

  def __call__(self, texts: Sequence[str], prompt: Sequence[str] | None = None,
               **_) -> list[float]:
    prompts = list(prompt) if prompt is not None else [""] * len(texts)
    if len(prompts) != len(texts):
      raise ValueError(f"{len(texts)} responses but {len(prompts)} prompts")
    out: list[float] = []
    for lo in range(0, len(texts), self.batch_size):
      rows = [{"prompt": p, "chosen": t, "rejected": ""}
              for p, t in zip(prompts[lo:lo + self.batch_size], texts[lo:lo + self.batch_size])]
      real = len(rows)
      rows += [rows[0]] * (self.batch_size - real)  # one compiled shape
      tokens, mask = encode_pairs(self.tok, rows, self.template, self.max_len)["chosen"]
      out += [self.scale * float(r) for r in np.asarray(self._score(self.params, tokens, mask))[:real]]
    return out

  def register(self, name: str, view: str, overwrite: bool = False):
    """Adds this model to the reward registry (e.g. 'helpfulness' on 'summary')."""
    return registry.register(name, self, inputs=("prompt",), kind="batch", view=view,
                             overwrite=overwrite)
