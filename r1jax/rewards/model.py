"""Scalar reward models on the r1jax decoder, trained on preference pairs (Bradley–Terry).

R1's all-scenario RL scores helpfulness on the summary after </think> and
safety on the whole response with such models. A reward model is the policy's
decoder plus a linear head on the final hidden state of the last real token:
r = h_last · w + b. Training minimises −log σ(r_chosen − r_rejected) over
(prompt, chosen, rejected) rows, with the same mesh, logical-axis shardings
and donated jitted step as the policy. `RewardModel.batch_fn()` plugs a
trained model into the reward registry as a "batch" reward.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax import model as model_lib
from r1jax import sharding as sharding_lib
from r1jax.config import ModelConfig, model_config

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- data


def load_pairs(path: str | Path) -> list[dict[str, str]]:
  """Preference rows {prompt, chosen, rejected} from jsonl; bad rows logged and skipped."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"preference data {path} does not exist")
  rows, bad = [], 0
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
        if missing:
          raise ValueError(f"missing or non-string fields {missing}")
        rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
      except (ValueError, AttributeError) as e:
        bad += 1
        log.warning("%s:%d: skipped preference row: %s", path, n, e)
  if bad:
    log.warning("%s: %d malformed rows skipped, %d kept", path, bad, len(rows))
  if not rows:
    raise ValueError(f"{path} holds no usable preference rows ({bad} malformed)")
  return rows


def encode_pairs(tokenizer, rows: Sequence[dict], template: str, max_len: int):
  """Right-padded (tokens, mask) for chosen and rejected: each (B, max_len).

  The prompt is rendered with the chat template and the response appended;
  an over-long sequence keeps its end (the response), where the score is read.
  """
  from r1jax.tokenizer import render_prompt
  out = {}
  for side in ("chosen", "rejected"):
    tokens = np.full((len(rows), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), bool)
    for i, row in enumerate(rows):
      ids = tokenizer.encode(render_prompt(template, row["prompt"]) + row[side])
      if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
      ids = ids[-max_len:]
      tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    out[side] = (tokens, mask)
  return out


# ------------------------------------------------------------------------- training


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RMState:
  """Reward-model train state: a plain pytree, donated to each step."""

  params: Any  # {"backbone": model params, "head": {"w": (D,), "b": ()}}
  opt_state: Any  # optax state, sharded like params
  step: jax.Array  # () int32


class RMTrainer:
  """Sharded init and a jitted, donated Bradley–Terry step for one mesh."""

  def __init__(self, cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh):
    self.cfg, self.tx, self.mesh = cfg, optimizer, mesh
    abstract = jax.eval_shape(lambda: self._init(jax.random.key(0), None))
    self.state_shardings = self._shardings(abstract)
    self._steps: dict = {}

  def _init(self, key, backbone):
    params = init_rm(self.cfg, key, backbone)
    return RMState(params, self.tx.init(params), jnp.zeros((), jnp.int32))

  def _shardings(self, abstract: RMState) -> RMState:
    params = sharding_lib.tree_shardings(rm_axes(self.cfg), abstract.params, self.mesh)
    rep = NamedSharding(self.mesh, P())
    # Optimizer moments are sharded like their params; counts etc. replicated.
    opt = optax.tree_map_params(self.tx, lambda _, s: s, abstract.opt_state, params,
                                transform_non_params=lambda _: rep)
    return RMState(params, opt, rep)

  def init(self, key: jax.Array, backbone: model_lib.Params | None = None) -> RMState:
    """State built straight into its shardings; `backbone` e.g. an SFT policy's params."""
    return jax.jit(self._init, out_shardings=self.state_shardings)(key, backbone)

  def _loss(self, params, batch):
    (tc, mc), (tr, mr) = batch["chosen"], batch["rejected"]
    r_2B = score(params, jnp.concatenate([tc, tr]), jnp.concatenate([mc, mr]), self.cfg)
    b = tc.shape[0]
    return bradley_terry(r_2B[:b], r_2B[b:])

  def step(self, state: RMState, batch) -> tuple[RMState, dict]:
    """One optimizer step on a batch from `encode_pairs` (non-finite updates are skipped)."""
    b, t = batch["chosen"][0].shape
    if (b, t) not in self._steps:
      rows = sharding_lib.batch_sharding(self.mesh, (b, t))
      batch_sh = {"chosen": (rows, rows), "rejected": (rows, rows)}

      def update(state, batch):
        (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new = RMState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        # A non-finite loss or gradient leaves the state as it was (and says so).
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new,
                           RMState(state.params, state.opt_state, state.step + 1))
        return new, {**metrics, "rm/skipped": 1 - finite.astype(jnp.int32)}

      self._steps[(b, t)] = jax.jit(update, donate_argnums=(0,),
                                    in_shardings=(self.state_shardings, batch_sh),
                                    out_shardings=(self.state_shardings, None))
    return self._steps[(b, t)](state, batch)


def save_rm(path: str | Path, params, cfg: ModelConfig) -> Path:
  """Writes `path/model.json` (with kind=reward_model) and `path/params/` (orbax)."""
  from r1jax import checkpoint
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
    from r1jax.rewards import registry
    return registry.register(name, self, inputs=("prompt",), kind="batch", view=view,
                             overwrite=overwrite)


# --------------------------------------------------------------------------- stage


def _pair_accuracy(trainer: RMTrainer, params, tok, rows, template, max_len, batch) -> float:
  right = 0
  for lo in range(0, len(rows) - batch + 1, batch):
    enc = encode_pairs(tok, rows[lo:lo + batch], template, max_len)
    rc = score(params, *enc["chosen"], trainer.cfg)
    rr = score(params, *enc["rejected"], trainer.cfg)
    right += int(jnp.sum(rc > rr))
  return right / max(1, (len(rows) // batch) * batch)


def run(config, workdir: Path) -> dict:
  """The `reward_model` stage: Bradley–Terry training on preference jsonl, then save."""
  from r1jax.config import opt_config
  from r1jax.checkpoint import load_model
  from r1jax.tokenizer import load_tokenizer
  from r1jax.train_step import make_optimizer
  d = config.data
  train, held_out = load_pairs(d.train), (load_pairs(d.eval) if d.eval else [])
  tok = load_tokenizer(config.tokenizer)
  mesh = sharding_lib.make_mesh(config.mesh.shape)
  cfg, backbone = load_model(config.model, mesh, seed=config.seed)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
  trainer = RMTrainer(cfg, make_optimizer(opt_config(config.opt)), mesh)
  state = trainer.init(jax.random.key(config.seed), backbone)
  rng = np.random.default_rng(config.seed)
  order, metrics_path = rng.permutation(len(train)), workdir / "metrics.jsonl"
  with metrics_path.open("a") as log_file:
    for step in range(1, config.steps + 1):
      lo = ((step - 1) * d.batch) % max(1, len(train) - d.batch + 1)
      rows = [train[i] for i in order[lo:lo + d.batch]]
      state, m = trainer.step(state, encode_pairs(tok, rows, d.template, d.max_len))
      if step % config.log_every == 0 or step == config.steps:
        record = {"step": step, **{k: float(v) for k, v in m.items()}}
        if held_out and (step % config.eval_every == 0 or step == config.steps):
          record["rm/eval_accuracy"] = _pair_accuracy(trainer, state.params, tok, held_out,
                                                      d.template, d.max_len, d.batch)
        log_file.write(json.dumps(record) + "\n")
        log.info("reward model %s", record)
  out = save_rm(workdir / "reward_model", state.params, cfg)
  summary = {"stage": "reward_model", "checkpoint": str(out), "steps": config.steps,
             **{k: v for k, v in record.items() if k != "step"}}
  print(json.dumps(summary))
  return summary
