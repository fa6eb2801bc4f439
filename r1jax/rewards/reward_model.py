"""Scalar reward models on the r1jax decoder, trained on preference pairs (Bradley–Terry).

R1's all-scenario RL scores helpfulness on the summary after </think> and
safety on the whole response with such models. A reward model is the policy's
decoder plus a linear head on the final hidden state of the last real token:
r = h_last · w + b. The `reward_model` stage (stages/reward_model.py) trains it
on (prompt, chosen, rejected) rows with the policy's shared update step, mesh and
logical-axis shardings. `RewardModel` plugs a trained model into the reward
registry as a "device" reward: RL dispatches its forward when a batch is submitted and
collects it after the host rule rewards ran, so the two overlap.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from r1jax.core import attention, checkpoint, errors, multihost
from r1jax.core import model as model_lib
from r1jax.core import sharding as sharding_lib
from r1jax.core.config import ModelConfig
from r1jax.core.storage import Path
from r1jax.core.tokenizer import check_template, load_tokenizer
from r1jax.data.preferences import encode_pairs
from r1jax.rewards import registry
from r1jax.rewards.model_specs import RewardNorm, check_model_specs, norm_from


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
  h_NxTxD = model_lib.hidden_states(params["backbone"], tokens_NxT, cfg,
                                    attention.plan(mask_NxT))
  t = tokens_NxT.shape[1]
  last_N = (t - 1) - jnp.argmax(mask_NxT[:, ::-1], axis=1)
  h_NxD = jnp.take_along_axis(h_NxTxD, last_N[:, None, None], axis=1)[:, 0]
  w_D = params["head"]["w"].astype(jnp.float32)
  return h_NxD.astype(jnp.float32) @ w_D + params["head"]["b"].astype(jnp.float32)


_score = jax.jit(score, static_argnames="cfg")  # compiled once per model shape and batch
BATCH_SIZE = 32  # rows a forward when a spec does not say (all processes' together)


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
  mesh = mesh or sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])

  def target(cfg):
    abstract = jax.eval_shape(lambda: init_rm(cfg, jax.random.key(0)))
    return checkpoint.abstract_like(abstract,
                                    sharding_lib.tree_shardings(rm_axes(cfg), abstract, mesh))
  return checkpoint.load_params(path, mesh, kind="reward_model", target=target)


# ------------------------------------------------------------------------- scoring


class _Launched:
  """Scores dispatched to the device; `result()` brings this host's rows back once."""

  def __init__(self, parts: list, n: int, finish):
    self._parts, self._n, self._finish = parts, n, finish

  def result(self) -> list[float]:
    raw = [np.asarray(multihost.host_rows(p)) for p in self._parts]
    raw = np.concatenate(raw)[:self._n] if raw else np.zeros((0,), np.float32)
    return [float(v) for v in self._finish(raw)]


class RewardModel:
  """A trained RM as a device reward: `launch(texts, prompt=[...])` encodes on the host and
  dispatches the jitted scoring (asynchronous), `result()` collects; calling it does both.

  The texts are the view the component asks for (the summary after </think> for helpfulness,
  the whole response for safety), wrapped in the chat template the RM was trained with,
  exactly as the reward_model stage encodes them.
  """

  def __init__(self, params, cfg: ModelConfig, tokenizer, *, template: str = "chatml",
               max_len: int = 512, batch_size: int = BATCH_SIZE, scale: float = 1.0,
               norm: RewardNorm | None = None, mesh: Mesh | None = None):
    check_template(tokenizer, template, "reward model")
    self.params, self.cfg, self.tok, self.mesh = params, cfg, tokenizer, mesh
    self.template, self.max_len, self.batch_size, self.scale = template, max_len, batch_size, scale
    self.norm = norm or RewardNorm()

  @property
  def every_process(self) -> bool:
    """In several processes every one launches and collects each batch, rows or none: the
    forward is one program over all of their rows."""
    return jax.process_count() > 1

  @classmethod
  def load(cls, path: str | Path, tokenizer, mesh: Mesh | None = None, **kwargs) -> RewardModel:
    """A saved reward model (reward_model stage output), restored into `mesh`."""
    cfg, params = load_rm(path, mesh)
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} ids, the RM only "
                       f"{cfg.vocab_size}")
    return cls(params, cfg, tokenizer, mesh=mesh, **kwargs)

  def _dispatch(self, texts: Sequence[str], prompt: Sequence[str] | None) -> list:
    """Encodes on the host and dispatches the scoring, batch by batch: device arrays. In
    several processes a batch is global, one program whatever their number: each process
    adds `batch_size / processes` rows (padded alike) on its own devices, for as many
    batches as the process with the most rows needs."""
    prompts = list(prompt) if prompt is not None else [""] * len(texts)
    if len(prompts) != len(texts):
      raise ValueError(f"{len(texts)} responses but {len(prompts)} prompts")
    rows = [{"prompt": p, "chosen": t, "rejected": ""} for p, t in zip(prompts, texts)]
    if self.every_process and (self.mesh is None or self.batch_size % jax.process_count()):
      raise ValueError(f"a reward model in {jax.process_count()} processes needs a mesh over "
                       f"their devices and a batch_size ({self.batch_size}) they split")
    per = self.batch_size // jax.process_count()
    batches = -(-len(rows) // per)
    if self.every_process:
      batches = multihost.max_over_processes(batches)
    parts = []
    for lo in range(0, batches * per, per):
      chunk = rows[lo:lo + per] or [{"prompt": "", "chosen": "", "rejected": ""}]
      chunk += [chunk[0]] * (per - len(chunk))  # one compiled shape
      inputs = encode_pairs(self.tok, chunk, self.template, self.max_len)["chosen"]
      if self.every_process:
        shape = (self.batch_size, self.max_len)
        inputs = multihost.to_global(inputs, (sharding_lib.batch_sharding(self.mesh, shape),) * 2)
      parts.append(_score(self.params, *inputs, self.cfg))
    return parts

  def _finish(self, raw: np.ndarray) -> np.ndarray:
    """Scaled, normalised scores of this host's rows; a running normalisation counts every
    process's scores, in process order (as one process holding all the rows would)."""
    if self.norm.mode == "running" and self.every_process:
      every = multihost.gather_json([float(v) for v in raw])
      self.norm.update(np.asarray([v for part in every for v in part], np.float64))
      return self.scale * self.norm.apply(raw)
    return self.scale * self.norm(raw)

  def launch(self, texts: Sequence[str], prompt: Sequence[str] | None = None,
             **_) -> _Launched:
    return _Launched(self._dispatch(texts, prompt), len(texts), self._finish)

  def __call__(self, texts: Sequence[str], prompt: Sequence[str] | None = None,
               **_) -> list[float]:
    return self.launch(texts, prompt).result() if len(texts) or self.every_process else []


# ------------------------------------------------------------------ from a reward spec


def load_models(specs: Any, mesh: Mesh | None = None) -> dict[str, registry.RewardDef]:
  """Loads each reward model a spec declares (rewards/model_specs.py) once, sharded on
  `mesh`: name -> device RewardDef, for `RewardScorer(spec, models=...)`.

  A tokenizer that disagrees with the declared template, or a folder that is not a reward
  model, fails here, before any rollout.
  """
  out = {}
  for m in check_model_specs(specs):
    model_ = RewardModel.load(
        m["path"], load_tokenizer(m["tokenizer"]), mesh, template=m.get("template", "chatml"),
        max_len=int(m.get("max_len", 1024)), batch_size=int(m.get("batch_size", BATCH_SIZE)),
        scale=float(m.get("scale", 1.0)),
        norm=norm_from(m.get("norm", "none"), m["path"],
                       {"template": m.get("template", "chatml")}))
    out[m["name"]] = registry.RewardDef(model_, ("prompt",), "device", m.get("view", "full"))
  return out


def check_processes(stage: str, config: Any) -> None:
  """Reward models run in several processes on the policy's mesh, a forward of `batch_size`
  rows taking an equal share from each process: devices of their own (`mesh.reward_devices`,
  the last devices, which are one process's) and a batch_size the processes do not split
  are refused (ConfigError), before any work."""
  count, models = jax.process_count(), config.rewards.get("models") or []
  if count == 1 or not models:
    return
  if config.mesh.get("reward_devices", 0):
    raise errors.ConfigError(f"{stage}: mesh.reward_devices gives the reward models devices of "
                             "their own, which in several processes are not every process's; "
                             "set it to 0 (they then share the policy's mesh)")
  for m in models:
    if int(m.get("batch_size", BATCH_SIZE)) % count:
      raise errors.ConfigError(f"{stage}: reward model {m.get('name')!r} has batch_size "
                               f"{m.get('batch_size', BATCH_SIZE)}, which {count} processes "
                               "do not split (each feeds an equal share of every forward)")
