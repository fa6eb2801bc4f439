"""Hugging Face checkpoints (config.json + safetensors shards) <-> r1jax params.

Loading validates every tensor's presence and shape from the safetensors
headers before reading any data, then fills each parameter layer by layer:
one HF tensor at a time is read (memory-mapped) on the host, put onto the
devices in its target sharding, and written into a donated, already-sharded
stacked buffer. Neither the host nor any single device ever holds the whole
checkpoint. Export streams the other way, one layer slice at a time.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save, save_file

from r1jax.core import checkpoint
from r1jax.core import model as model_lib
from r1jax.core import storage
from r1jax.core.config import ModelConfig, RopeScaling
from r1jax.core.storage import Path

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict; unsupported features fail loudly."""
  archs = hf.get("architectures") or []
  arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    raise ValueError(f"unknown architecture {archs or hf.get('model_type')!r}; "
                     f"supported: {sorted(ARCHITECTURES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
  if hf.get("use_sliding_window") or (arch == "llama" and hf.get("sliding_window")):
    raise ValueError("sliding-window attention is not supported")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  rope = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = None
  if rope_type == "llama3":
    src = {**legacy, **rope}
    scaling = RopeScaling(factor=float(src["factor"]),
                          low_freq_factor=float(src["low_freq_factor"]),
                          high_freq_factor=float(src["high_freq_factor"]),
                          original_max_position=int(src["original_max_position_embeddings"]))
  elif rope_type != "default":
    raise ValueError(f"unsupported rope type {rope_type!r} (default or llama3)")
  heads = hf["num_attention_heads"]
  attention_bias = bool(hf.get("attention_bias", False))
  fields = dict(
      vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
      heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], rope_theta=float(theta), rope_scaling=scaling,
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=arch == "qwen2" or attention_bias,
      out_bias=arch == "llama" and attention_bias,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position=int(hf.get("max_position_embeddings", 32768)), arch=arch)
  fields.update(overrides)
  return ModelConfig(**fields)


def _export_as_qwen2(cfg: ModelConfig) -> bool:
  # HF Qwen2 always has q/k/v biases, never an o bias, and no llama3 rope;
  # anything else is written as Llama (attention_bias, zeros where we have none).
  return cfg.arch == "qwen2" and cfg.qkv_bias and not cfg.out_bias and cfg.rope_scaling is None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """An HF config.json dict that transformers loads as the same model."""
  qwen = _export_as_qwen2(cfg)
  out: dict[str, Any] = dict(
      architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      model_type="qwen2" if qwen else "llama",
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
      rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position, tie_word_embeddings=cfg.tie_embeddings,
      torch_dtype=cfg.param_dtype, use_cache=True)
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    out["rope_scaling"] = dict(rope_type="llama3", factor=s.factor,
                               low_freq_factor=s.low_freq_factor,
                               high_freq_factor=s.high_freq_factor,
                               original_max_position_embeddings=s.original_max_position)
  if qwen:
    out.update(use_sliding_window=False, sliding_window=None)
  else:
    out.update(attention_bias=cfg.qkv_bias or cfg.out_bias, mlp_bias=False)
  return out


# --------------------------------------------------------------------- tensor table
# Each r1jax param maps to an HF tensor name (per layer for stacked params),
# the HF shape, and the two layout transforms (HF Linear stores (out, in)).


def _tensor_table(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable, Callable]]:
  d, f, v, n, k, hd = cfg.hidden, cfg.mlp_dim, cfg.vocab_size, cfg.heads, cfg.kv_heads, cfg.head_dim
  ident = lambda x: x
  a = "model.layers.{}.self_attn."
  m = "model.layers.{}.mlp."
  t = {
      "embed": ("model.embed_tokens.weight", (v, d), ident, ident),
      "final_norm": ("model.norm.weight", (d,), ident, ident),
      "layers/attn_norm": ("model.layers.{}.input_layernorm.weight", (d,), ident, ident),
      "layers/mlp_norm": ("model.layers.{}.post_attention_layernorm.weight", (d,), ident, ident),
      "layers/q": (a + "q_proj.weight", (n * hd, d),
                   lambda x: x.T.reshape(d, n, hd), lambda x: x.reshape(d, n * hd).T),
      "layers/k": (a + "k_proj.weight", (k * hd, d),
                   lambda x: x.T.reshape(d, k, hd), lambda x: x.reshape(d, k * hd).T),
      "layers/v": (a + "v_proj.weight", (k * hd, d),
                   lambda x: x.T.reshape(d, k, hd), lambda x: x.reshape(d, k * hd).T),
      "layers/o": (a + "o_proj.weight", (d, n * hd),
                   lambda x: x.T.reshape(n, hd, d), lambda x: x.reshape(n * hd, d).T),
      "layers/gate": (m + "gate_proj.weight", (f, d), lambda x: x.T, lambda x: x.T),
      "layers/up": (m + "up_proj.weight", (f, d), lambda x: x.T, lambda x: x.T),
      "layers/down": (m + "down_proj.weight", (d, f), lambda x: x.T, lambda x: x.T),
  }
  if cfg.qkv_bias:
    for name, heads in (("q", n), ("k", k), ("v", k)):
      t[f"layers/{name}_bias"] = (a + f"{name}_proj.bias", (heads * hd,),
                                  lambda x, h=heads: x.reshape(h, hd), lambda x: x.reshape(-1))
  if cfg.out_bias:
    t["layers/o_bias"] = (a + "o_proj.bias", (d,), ident, ident)
  if not cfg.tie_embeddings:
    t["lm_head"] = ("lm_head.weight", (v, d), lambda x: x.T, lambda x: x.T)
  return t


def _hf_names(name: str, template: str, cfg: ModelConfig) -> list[str]:
  return [template.format(i) for i in range(cfg.layers)] if name.startswith("layers/") else [template]


# -------------------------------------------------------------------------- loading


def _weight_files(hf_dir: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file holding it."""
  index = hf_dir / _INDEX
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: hf_dir / fname for name, fname in weight_map.items()}
  files = storage.glob(hf_dir, "*.safetensors")
  if not files:
    raise FileNotFoundError(f"no *.safetensors files (and no {_INDEX}) in {hf_dir}")
  out = {}
  for path in files:
    with safe_open(storage.local_file(path), framework="np") as f:
      out.update({name: path for name in f.keys()})
  return out


class _Reader:
  """Keeps safetensors files open (memory-mapped) while a checkpoint loads."""

  def __init__(self):
    self._open: dict[Path, Any] = {}

  def handle(self, path: Path):
    if path not in self._open:
      if not path.exists():
        raise FileNotFoundError(f"safetensors shard {path} named by the index is missing")
      self._open[path] = safe_open(storage.local_file(path), framework="np")  # a memory map
    return self._open[path]

  def shape(self, path: Path, name: str) -> tuple[int, ...]:
    return tuple(self.handle(path).get_slice(name).get_shape())

  def read(self, path: Path, name: str) -> np.ndarray:
    return self.handle(path).get_tensor(name)


def _check_tensors(table, files: dict[str, Path], reader: _Reader, cfg: ModelConfig) -> None:
  """Fails (listing every problem) before any weight is read."""
  missing, wrong = [], []
  for name, (template, hf_shape, _, _) in table.items():
    for hf_name in _hf_names(name, template, cfg):
      if hf_name not in files:
        missing.append(hf_name)
        continue
      got = reader.shape(files[hf_name], hf_name)
      if got != hf_shape:
        wrong.append(f"{hf_name}: shape {got} in {files[hf_name].name}, config.json implies "
                     f"{hf_shape}")
  if missing or wrong:
    lines = [f"missing tensor {m}" for m in missing[:20]] + wrong[:20]
    more = len(missing) + len(wrong) - len(lines)
    raise ValueError("checkpoint does not match its config.json:\n  " + "\n  ".join(lines)
                     + (f"\n  … and {more} more" if more > 0 else ""))


# Writes one layer into the stacked buffer (donated: updated in place).
_place_layer = jax.jit(lambda stacked_LxX, layer_X, i: jax.lax.dynamic_update_index_in_dim(
    stacked_LxX, layer_X, i, 0), donate_argnums=(0,))


def _per_layer(s: Any) -> Any:
  return NamedSharding(s.mesh, P(*s.spec[1:])) if isinstance(s, NamedSharding) else s


def load_pretrained(hf_dir: str | os.PathLike, mesh: Mesh | None = None, abstract: bool = False,
                    **overrides) -> tuple[ModelConfig, model_lib.Params]:
  """Loads an HF Qwen2/Llama folder into (ModelConfig, params) sharded on `mesh`.

  `overrides` set ModelConfig fields not stored by HF (param_dtype,
  compute_dtype, remat). Without a mesh, params land on the first device. `abstract`: the
  config and the params' ShapeDtypeStructs only (a run about to restore its own checkpoint).
  """
  hf_dir = Path(hf_dir)
  config_path = hf_dir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"no config.json in {hf_dir}: not a Hugging Face model folder")
  cfg = config_from_hf(json.loads(config_path.read_text()), **overrides)
  if abstract:
    return cfg, checkpoint.abstract_params(cfg, mesh)
  table = _tensor_table(cfg)
  files = _weight_files(hf_dir)
  reader = _Reader()
  _check_tensors(table, files, reader, cfg)
  target = model_lib.flatten(checkpoint.abstract_params(cfg, mesh))
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  flat = {}
  for name, (template, _, to_ours, _) in table.items():
    if not name.startswith("layers/"):
      host = to_ours(reader.read(files[template], template)).astype(dtype)
      flat[name] = jax.device_put(host, target[name].sharding)
      continue
    # Allocate the stacked buffer directly in its sharding, then fill it a
    # layer at a time (donated, so the update is in place).
    stacked = jax.jit(lambda s=target[name].shape: jnp.zeros(s, dtype),
                      out_shardings=target[name].sharding)()
    layer_sharding = _per_layer(target[name].sharding)
    for i, hf_name in enumerate(_hf_names(name, template, cfg)):
      host = to_ours(reader.read(files[hf_name], hf_name)).astype(dtype)
      stacked = _place_layer(stacked, jax.device_put(host, layer_sharding),
                                     jnp.int32(i))
    flat[name] = stacked
  return cfg, model_lib.unflatten(flat)


# -------------------------------------------------------------------------- saving


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _hf_tensors(cfg: ModelConfig, params: model_lib.Params, dtype) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
  """(HF name, HF shape, loader) in checkpoint order; loaders fetch one slice each."""
  flat = model_lib.flatten(params)
  table = _tensor_table(cfg)
  zeros = lambda shape: (lambda: np.zeros(shape, dtype))
  if not _export_as_qwen2(cfg) and (cfg.qkv_bias or cfg.out_bias):
    # Llama's attention_bias covers q, k, v and o alike: fill what we lack with zeros.
    d, n, k, hd = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    a = "model.layers.{}.self_attn."
    if not cfg.qkv_bias:
      for nm, h in (("q", n), ("k", k), ("v", k)):
        table[f"zeros/{nm}"] = (a + f"{nm}_proj.bias", (h * hd,), None, None)
    if not cfg.out_bias:
      table["zeros/o"] = (a + "o_proj.bias", (d,), None, None)
  whole = lambda name: (table[name][0], table[name][1],
                        lambda: table[name][3](_to_host(flat[name])).astype(dtype))
  yield whole("embed")
  for i in range(cfg.layers):
    for name in sorted(n for n in table if n.startswith(("layers/", "zeros/"))):
      template, hf_shape, _, to_hf = table[name]
      if name.startswith("zeros/"):
        yield template.format(i), hf_shape, zeros(hf_shape)
      else:
        yield (template.format(i), hf_shape,
               lambda a=flat[name], i=i, f=to_hf: f(_to_host(a[i])).astype(dtype))
  yield whole("final_norm")
  if "lm_head" in table:
    yield whole("lm_head")


def save_pretrained(model_config: ModelConfig, params: model_lib.Params,
                    out_dir: str | os.PathLike, *, max_shard_bytes: int = 4 << 30,
                    dtype: str | None = None) -> Path:
  """Writes params as an HF folder (config.json, safetensors shards + index).

  Shards are planned from shapes, then each is filled and written in turn, so
  host memory stays at about one shard.
  """
  cfg = model_config
  expected = {n: s for n, (s, _, _) in model_lib.param_table(cfg).items()}
  got = {n: tuple(a.shape) for n, a in model_lib.flatten(params).items()}
  if got != expected:
    bad = sorted(set(got.items()) ^ set(expected.items()))
    raise ValueError(f"params do not match the model config: {bad[:10]}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  tensors = list(_hf_tensors(cfg, params, np_dtype))
  shards: list[list] = [[]]
  size = 0
  for item in tensors:
    nbytes = math.prod(item[1]) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1
             else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    arrays = {name: np.ascontiguousarray(load()) for name, _, load in shard}
    if storage.is_remote(out):
      (out / fname).write_bytes(save(arrays, metadata={"format": "pt"}))
    else:
      save_file(arrays, str(out / fname), metadata={"format": "pt"})
    total += sum(a.nbytes for a in arrays.values())
    weight_map.update({name: fname for name in arrays})
  if len(shards) > 1:
    (out / _INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  hf_config = config_to_hf(cfg.replace(param_dtype=str(jnp.dtype(np_dtype))))
  (out / "config.json").write_text(json.dumps(hf_config, indent=2))
  return out
