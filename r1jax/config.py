"""Typed views of the experiment ConfigDict, plus model-shape presets.

Experiments are Python files whose `get_config(arg)` returns a locked
`ml_collections.ConfigDict`; the library reads it through the small frozen
dataclasses here so that a typo or an inconsistent shape fails at start-up,
not deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")


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
  arch: str = "qwen2"  # "qwen2" or "llama": only used for HF export

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
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} not in {REMAT_POLICIES}")
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
  fields = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
  fields.pop("preset", None)
  fields.pop("hf_dir", None)
  scaling = fields.pop("rope_scaling", None)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(fields) - known
  if unknown:
    raise ValueError(f"unknown model config fields: {sorted(unknown)}")
  # rope_scaling.factor == 0 is the config placeholder for "no scaling".
  scaling = RopeScaling(**scaling) if scaling and scaling.get("factor") else None
  return ModelConfig(rope_scaling=scaling, **fields)


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


def model_group(preset: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """The `model` config group: a preset's shape (or the 3.5M tiny default) plus overrides."""
  m = ml_collections.ConfigDict()
  m.preset = preset or ""  # name in PRESETS the shape came from ('' = custom)
  m.hf_dir = ""  # local HF folder to load weights (and shape) from; '' = random init
  m.vocab_size = 1024  # V: token ids the embedding holds
  m.hidden = 256  # D: residual width
  m.layers = 4  # L: decoder blocks
  m.heads = 4  # H: query heads
  m.kv_heads = 2  # K: key/value heads (grouped-query attention)
  m.head_dim = 64  # per-head width (Llama may set it != hidden / heads)
  m.mlp_dim = 768  # SwiGLU inner width
  m.rope_theta = 10000.0  # rotary base
  m.rms_eps = 1e-6  # RMSNorm epsilon
  m.qkv_bias = True  # q/k/v projection biases (Qwen2 has them)
  m.out_bias = False  # o-projection bias (Llama attention_bias=True)
  m.tie_embeddings = True  # lm_head shares the embedding matrix
  m.max_position = 4096  # longest sequence the rope / cache are sized for
  m.param_dtype = "float32"  # storage dtype of params (bfloat16 on accelerators)
  m.compute_dtype = "float32"  # activation dtype (bfloat16 on accelerators)
  m.remat = "none"  # activation checkpointing: none | full | save_dots
  m.arch = "qwen2"  # HF family for export: qwen2 | llama
  # Llama-3.1 rope scaling; factor == 0 means none (kept so CLI overrides work).
  m.rope_scaling = ml_collections.ConfigDict(dict(
      factor=0.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192))
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
