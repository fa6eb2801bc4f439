"""Typed views of the experiment ConfigDict, plus model-shape presets.

Experiments are Python files whose `get_config(arg)` returns a locked
`ml_collections.ConfigDict`; the library reads it through the small frozen
dataclasses here so that a typo or an inconsistent shape fails at start-up,
not deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import ml_collections

from r1jax.core.storage import Path

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("auto", "xla", "splash", "pallas_gpu", "cudnn")  # core/kernels.py


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 frequency-dependent rope scaling ("llama3" rope type)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Qwen2 / Llama-3 style decoder."""

  vocab_size: int
  hidden: int  # D
  layers: int  # L
  heads: int  # H
  kv_heads: int  # K
  head_dim: int
  mlp_dim: int  # SwiGLU inner width
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2: True
  out_bias: bool = False  # Llama attention_bias=True also biases o_proj
  tie_embeddings: bool = False
  max_position: int = 32768
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES
  # Uncached rows longer than this attend in query blocks of it (0: always in one piece;
  # core/attention.py). Smaller than the rows can pay on XLA:CPU: tiny_r1's SFT steps on
  # 256-token packed rows, in blocks of 64 with remat "full" (benchmarks/tiny_r1/README.md).
  attention_block: int = 256
  arch: str = "qwen2"  # "qwen2" or "llama": only used for HF export
  attention: str = "auto"  # ATTENTION_IMPLS (auto: by platform, core/kernels.py)

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads",
                 "head_dim", "mlp_dim"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.heads % self.kv_heads:
      raise ValueError(
          f"model.heads={self.heads} must be a multiple of "
          f"model.kv_heads={self.kv_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r} not in {DTYPES}")
    if self.attention_block < 0:
      raise ValueError(f"model.attention_block must be >= 0, got {self.attention_block}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} not in {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention={self.attention!r} not in {ATTENTION_IMPLS}")
    if self.arch not in ("qwen2", "llama"):
      raise ValueError(f"model.arch={self.arch!r} must be 'qwen2' or 'llama'")

  @property
  def num_params(self) -> int:
    """Parameter count, embeddings included."""
    d, f, hd = self.hidden, self.mlp_dim, self.head_dim
    attn = d * hd * (2 * self.heads + 2 * self.kv_heads)
    if self.qkv_bias:
      attn += hd * (self.heads + 2 * self.kv_heads)
    if self.out_bias:
      attn += d
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.layers * per_layer + d + head

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (stored beside checkpoints)."""
    return dataclasses.asdict(self)


def model_config(cd: ml_collections.ConfigDict) -> ModelConfig:
  """Builds a ModelConfig from the `model` group of an experiment config."""
  fields = {k: v for k, v in (cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)).items()
            if k not in ("preset", "hf_dir", "init_from")}
  scaling = fields.pop("rope_scaling", None)
  # rope_scaling.factor == 0 is the config placeholder for "no scaling".
  scaling = RopeScaling(**scaling) if scaling and scaling.get("factor") else None
  return typed(ModelConfig, "model", {**fields, "rope_scaling": scaling})


# Public model shapes (from the released config.json files), for real-size
# recipes and param-count checks. hf_dir in a recipe overrides them on load.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden=896, layers=24, heads=14,
                         kv_heads=2, head_dim=64, mlp_dim=4864,
                         rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                         max_position=32768, arch="qwen2"),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden=1536, layers=28, heads=12,
                         kv_heads=2, head_dim=128, mlp_dim=8960,
                         rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                         max_position=131072, arch="qwen2"),
    "qwen2.5-7b": dict(vocab_size=152064, hidden=3584, layers=28, heads=28,
                       kv_heads=4, head_dim=128, mlp_dim=18944,
                       rope_theta=1e6, qkv_bias=True, tie_embeddings=False,
                       max_position=131072, arch="qwen2"),
    "llama3.1-8b": dict(vocab_size=128256, hidden=4096, layers=32, heads=32,
                        kv_heads=8, head_dim=128, mlp_dim=14336,
                        rope_theta=500000.0, rms_eps=1e-5, qkv_bias=False,
                        rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position=8192),
                        tie_embeddings=False, max_position=131072, arch="llama"),
}


# The default shape (3.5M parameters, the tests' and tiny experiments' model).
TINY = dict(vocab_size=1024, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, mlp_dim=768,
            qkv_bias=True, tie_embeddings=True, max_position=4096)


def model_group(preset: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """The `model` config group: a preset's shape (or the 3.5M tiny default) plus overrides."""
  m = ml_collections.ConfigDict({
      "preset": preset or "",  # name in PRESETS the shape came from ('' = custom)
      "hf_dir": "",  # local HF folder to load weights (and shape) from; '' = random init
      "init_from": "",  # r1jax params checkpoint (model.json + params/); wins over hf_dir
      **{f.name: f.default for f in dataclasses.fields(ModelConfig)
         if f.default is not dataclasses.MISSING},  # fields: ModelConfig (comments there)
      **TINY,
      # Llama-3.1 rope scaling; factor == 0 means none (kept so CLI overrides work).
      "rope_scaling": dict(factor=0.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position=8192)})
  values: dict[str, Any] = {}
  if preset is not None:
    if preset not in PRESETS:
      raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    values.update(PRESETS[preset])
  values.update(overrides)
  for key, value in values.items():
    if key not in m:
      raise ValueError(f"unknown model field {key!r}")
    if key == "rope_scaling":
      m.rope_scaling.update(value or {"factor": 0.0})
    else:
      m[key] = value
  return m


def non_finite_fields(config: Any, prefix: str = "") -> list[str]:
  """Dotted names of a config's numbers that are NaN or ±inf, nested groups and lists
  included. No setting means anything as one: a NaN learning rate, for one, passes every
  range check and trains nothing."""
  if isinstance(config, (ml_collections.ConfigDict, dict)):
    items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in config.items()]
  elif isinstance(config, (list, tuple)):
    items = [(f"{prefix}[{i}]", v) for i, v in enumerate(config)]
  else:
    return [prefix] if isinstance(config, float) and not math.isfinite(config) else []
  return [name for key, value in items for name in non_finite_fields(value, key)]


def config_from_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an experiment file, as `--config=PATH:ARG` loads it (pipelines
  that run another experiment as one of their stages)."""
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses big_vision-style `key=value,flag` config args against typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:  # a bare name sets a bool flag
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


# --- GRPO and optimiser groups -------------------------------------------------

LOSS_MODES = ("grpo", "bnpo", "dr_grpo")
ADV_SCALES = ("group", "batch", "none")
OVERLAPS = ("", "rewards", "rollout")  # grpo.overlap: off | scoring only | sampling too
REWARD_NORMS = ("sum", "per_component")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The GRPO objective and how one rollout batch is split into updates.

  The one source of the `grpo` group's defaults: `grpo_group()` is built from these fields
  (TRL-like defaults; R1-Zero's values in the comments).
  """

  group_size: int = 16  # G: completions per prompt (R1-Zero: 16)
  temperature: float = 1.0  # rollout temperature; logprobs use the same scaling (R1-Zero: 1.0)
  loss_mode: str = "grpo"  # grpo (mean of seq means) | bnpo (token mean, DAPO) | dr_grpo (/ N*T)
  adv_scale: str = "group"  # advantage std division: group | batch (whole rollout) | none
  adv_eps: float = 1e-4  # added to the std in the advantage denominator (TRL: 1e-4)
  adv_ddof: int = 1  # std's delta degrees of freedom (TRL: 1, Bessel)
  reward_norm: str = "sum"  # reward components: sum then normalise | per_component (then sum)
  eps_low: float = 0.2  # ratio clipped below at 1 - eps_low (R1-Zero: 10, i.e. hardly clipped)
  eps_high: float = 0.2  # ratio clipped above at 1 + eps_high; > eps_low: clip-higher
  dual_clip: float = 0.0  # dual-clip constant c > 1 bounding the loss for A < 0; 0 = off
  beta: float = 0.001  # k3 KL-to-reference coefficient; 0 skips the reference (R1-Zero: 0.001)
  mu: int = 1  # optimisation passes over each rollout batch (R1-Zero: 1)
  minibatches: int = 1  # M: optimizer updates per pass (R1-Zero: 16)
  microbatches: int = 1  # A: gradient-accumulation steps per update (memory only)
  mask_truncated: bool = False  # drop completions that hit the length limit from the loss
  recompute_old_logp: bool = False  # PPO ratio against the pre-update policy, not the sampler
  tis_cap: float = 2.0  # ratio not against the sampler: loss × min(π_old / π_sampler, cap); 0 off
  overlap: str = ""  # rl, one step off-policy: "" off | rewards | rollout (stages/rl_ahead.py)
  ref_reset_every: int = 0  # RL iterations between reference := policy; 0 = never (R1-Zero: 400)
  ref_dtype: str = "float32"  # storage dtype of the frozen reference (bfloat16 halves it)
  logits_chunk: int = 128  # completion positions per unembed chunk: bounds live logits
  pack: bool = True  # padding-free update: samples packed into rows (train/packing.py)
  pack_len: int = 0  # tokens per packed row; 0 = the padded row (prompt bucket + completion)
  share_prompts: bool = False  # packed rows: a group's short samples share one prompt copy

  def __post_init__(self):
    for name, allowed in (("loss_mode", LOSS_MODES), ("adv_scale", ADV_SCALES),
                          ("reward_norm", REWARD_NORMS), ("ref_dtype", DTYPES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"grpo.{name}={getattr(self, name)!r} not in {allowed}")
    for name in ("group_size", "mu", "minibatches", "microbatches", "logits_chunk"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
    if self.temperature <= 0:
      raise ValueError(f"grpo.temperature must be > 0, got {self.temperature}")
    # eps_low >= 1 is allowed: no lower clip at all (R1-Zero's eps = 10).
    if self.eps_low < 0 or self.eps_high < 0:
      raise ValueError(f"grpo clip range needs eps_low >= 0 and eps_high >= 0, got "
                       f"eps_low={self.eps_low}, eps_high={self.eps_high}")
    if self.dual_clip and self.dual_clip <= 1:
      raise ValueError(f"grpo.dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
    if self.beta < 0 or self.adv_eps < 0 or self.adv_ddof not in (0, 1):
      raise ValueError("grpo.beta and grpo.adv_eps must be >= 0 and grpo.adv_ddof 0 or 1")
    if self.pack_len < 0:
      raise ValueError(f"grpo.pack_len must be >= 0, got {self.pack_len}")
    if self.ref_reset_every < 0:
      raise ValueError(f"grpo.ref_reset_every must be >= 0, got {self.ref_reset_every}")
    if self.overlap not in OVERLAPS:
      raise ValueError(f"grpo.overlap={self.overlap!r} not in {OVERLAPS}")
    if self.tis_cap and self.tis_cap < 1:
      raise ValueError(f"grpo.tis_cap must be 0 (off) or >= 1, got {self.tis_cap}")

  @property
  def decoupled(self) -> bool:
    """The PPO ratio is taken against the policy the update starts from, and the sampler's
    logprobs only weigh tokens (truncated importance sampling, `tis_cap`)."""
    return self.recompute_old_logp or bool(self.overlap)


@dataclasses.dataclass(frozen=True)
class OptConfig:
  """AdamW with linear warmup, a constant or cosine schedule and global-norm clipping.

  The one source of the `opt` group's defaults (`opt_group()` is built from these fields).
  """

  lr: float = 3e-6  # peak learning rate (R1-Zero: 3e-6)
  schedule: str = "constant"  # after warmup: constant | cosine (decays to final_lr_ratio * lr)
  warmup_steps: int = 0  # linear warmup: update k uses lr * (k + 1) / warmup_steps
  total_steps: int = 0  # cosine only: optimizer updates until the end of the decay
  final_lr_ratio: float = 0.1  # cosine only: final lr as a fraction of the peak
  b1: float = 0.9  # Adam first-moment decay
  b2: float = 0.999  # Adam second-moment decay
  eps: float = 1e-8  # Adam denominator epsilon
  weight_decay: float = 0.0  # decoupled weight decay on matrices (norms and biases excluded)
  grad_clip: float = 1.0  # global gradient-norm clip; 0 = off

  def __post_init__(self):
    if self.schedule not in LR_SCHEDULES:
      raise ValueError(f"opt.schedule={self.schedule!r} not in {LR_SCHEDULES}")
    if self.lr < 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
      raise ValueError("opt.lr, opt.warmup_steps, opt.grad_clip and opt.weight_decay must be >= 0")
    if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
      raise ValueError(f"opt.schedule='cosine' needs opt.total_steps > opt.warmup_steps, got "
                       f"{self.total_steps} <= {self.warmup_steps}")


def typed(cls, group: str, cd: Any):
  """cls(**fields of a config group or dict), refusing fields the dataclass does not have."""
  fields = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"unknown {group} config fields: {sorted(unknown)}")
  return cls(**fields)


def grpo_config(cd: ml_collections.ConfigDict) -> GRPOConfig:
  """Builds a GRPOConfig from the `grpo` group of an experiment config."""
  return typed(GRPOConfig, "grpo", cd)


def opt_config(cd: ml_collections.ConfigDict) -> OptConfig:
  """Builds an OptConfig from the `opt` group of an experiment config."""
  return typed(OptConfig, "opt", cd)


def _group(cls, name: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config group holding the defaults of dataclass `cls` (comments there), then overrides."""
  g = ml_collections.ConfigDict(dataclasses.asdict(cls()))
  for key, value in overrides.items():
    if key not in g:
      raise ValueError(f"unknown {name} field {key!r}")
    g[key] = value
  return g


def grpo_group(**overrides) -> ml_collections.ConfigDict:
  """The `grpo` config group: GRPOConfig's fields and defaults, then overrides."""
  return _group(GRPOConfig, "grpo", overrides)


def opt_group(**overrides) -> ml_collections.ConfigDict:
  """The `opt` config group: OptConfig's fields and defaults, then overrides."""
  return _group(OptConfig, "opt", overrides)


# --- groups every stage shares -------------------------------------------------


def ckpt_group(**overrides) -> ml_collections.ConfigDict:
  """The `ckpt` config group: cadence, retention and best-metric checkpoints."""
  c = ml_collections.ConfigDict()
  c.every = 50  # steps between checkpoints (SIGTERM and the last step always save)
  c.every_minutes = 10.0  # also save when this much wall time passed since the last save; 0 off
  c.keep = 2  # newest checkpoints kept
  c.async_save = True  # orbax writes in the background while training goes on
  c.best_metric = ""  # also keep the best step by this metric (e.g. eval/held_out/pass@1)
  c.best_mode = "max"  # max | min for best_metric
  c.update(overrides)
  return c


def eval_group(**overrides) -> ml_collections.ConfigDict:
  """The `eval` config group. R1's protocol: k samples per question at T 0.6, top-p 0.95."""
  e = ml_collections.ConfigDict()
  e.benchmarks = ""  # comma-separated jsonl paths ('' = none)
  e.k = 4  # samples per question (pass@1 averages them; cons@k votes)
  e.temperature = 0.6  # sampling temperature (R1: 0.6)
  e.top_p = 0.95  # nucleus (R1: 0.95)
  e.top_k = 0  # 0 = off
  e.max_new_tokens = 256  # completion budget
  e.stop = ("</answer>",)  # strings that end a completion (one or more tokens each)
  e.template = "r1_zero"  # prompt template (r1jax/core/tokenizer.py TEMPLATES)
  e.batch_size = 32  # prompts per sampler call
  e.limit = 0  # first N rows of each benchmark (0 = all)
  e.max_prompt_tokens = 512  # longer prompts are skipped and counted
  e.every = 0  # RL only: steps between held-out evals (0 = only at the end, if benchmarks)
  e.update(overrides)
  return e


def stage_group(stage: str, steps: int) -> ml_collections.ConfigDict:
  """The fields every training stage reads: what runs, seeds, model, mesh, ckpt, logging."""
  c = ml_collections.ConfigDict()
  c.stage = stage  # what r1jax.main runs (a name in r1jax.stages.STAGES)
  c.seed = 0  # PRNG seed for init, data order and sampling
  c.steps = steps  # optimizer steps (sft, reward_model) / RL iterations (rl)
  c.tokenizer = ""  # sentencepiece .model file or HF tokenizer folder
  c.model = model_group()  # init_from / hf_dir pick the weights (r1jax/core/weights.py)
  c.mesh = ml_collections.ConfigDict(dict(  # (data, fsdp, tensor); one -1 fills the devices
      shape=(-1, 1, 1),
      reward_devices=0))  # rl, generate: the last N devices hold the RMs (0: the policy's)
  c.ckpt = ckpt_group()
  c.log_every = 10  # steps between console progress lines (every step goes to the JSONL)
  c.tensorboard = True  # also write TensorBoard event files
  c.max_skipped_updates = 3  # non-finite updates in a row that stop the run (exit 69); 0: never
  c.max_bad_share = 0.01  # share of unusable input rows that stops the run (exit 65)
  return c


# --- comparing recorded configs -------------------------------------------------

_ABSENT = object()


def config_changes(old: Any, new: Any, prefix: str = "", added_ok: bool = False) -> list[str]:
  """'field: old -> new' for every leaf that differs between two JSON config dicts.

  added_ok: a field the old config does not have at all (a setting added by a later r1jax
  version; the old run ran with its then-only behaviour) is not a change.
  """
  if isinstance(old, dict) and isinstance(new, dict):
    return [change for key in sorted(set(old) | set(new))
            if not (added_ok and key not in old)
            for change in config_changes(old.get(key, _ABSENT), new.get(key, _ABSENT),
                                         f"{prefix}{key}.", added_ok)]
  shown = lambda x: None if x is _ABSENT else x
  return [] if _as_json(old) == _as_json(new) else [
      f"{prefix[:-1]}: {shown(old)!r} -> {shown(new)!r}"]


def _as_json(x: Any) -> Any:
  """Tuples as lists, as JSON records them: a setting read back from a run's config.json
  equals the same setting in a config file."""
  if isinstance(x, (list, tuple)):
    return [_as_json(v) for v in x]
  return {k: _as_json(v) for k, v in x.items()} if isinstance(x, dict) else x
