"""Jitted KV-cache sampler: prefill once, decode G samples per prompt, following the live rows.

1. Prompts are left-padded to a length bucket (powers of two), so a stream of
   varied prompts compiles once per (batch, bucket, max_new_tokens, params).
2. Prefill runs on the B prompts only; its cache is repeated G times into the
   N = B·G decode rows.
3. Decode runs in segments (generation/decode.py): each a `lax.while_loop` that
   samples, records and feeds the token back until a row bucket's worth of rows
   has ended or its cache window is full. Between segments the live rows are
   compacted into fewer slots and the cache grows by doubling, so a rollout's
   cost tracks the tokens generated, not rows × the longest row. A row ends at
   EOS, a stop sequence (one or more token ids, matched on the row's last
   tokens) or its own token budget.
4. Log-probs are those of the sampled token under the *untruncated*
   temperature-scaled distribution, log_softmax(logits / temperature): the
   policy the GRPO trainer differentiates, so sampler and trainer agree
   exactly. top-k / top-p only restrict which tokens can be drawn. Greedy
   (temperature 0) reports log_softmax(logits). Draws do not depend on the
   compaction: step t's uniforms are those of an uncompacted loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax.core import decode_attention
from r1jax.core import model as model_lib
from r1jax.core import multihost
from r1jax.core import sharding as sharding_lib
from r1jax.core.config import ModelConfig
from r1jax.generation import decode
from r1jax.generation.decode import (
    STOP_EOS, STOP_LENGTH, STOP_REASONS, STOP_STOP, Rollout, filter_logits)

__all__ = ["STOP_EOS", "STOP_LENGTH", "STOP_REASONS", "STOP_STOP", "Rollout", "Sampler",
           "SamplingParams", "bucket_length", "filter_logits", "keep_rows", "left_pad",
           "stop_token_ids"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to draw tokens; hashable, so it is static under jit."""

  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0  # nucleus mass kept (1 = off)
  top_k: int = 0  # keep the k most likely tokens (0 = off)
  max_new_tokens: int = 256  # completion budget T (per-request budgets may be lower)
  eos_id: int | None = None  # ends a row, stop reason "eos"
  # Token ids or id sequences that also end a row, reason "stop": a row stops
  # on the token that completes one (e.g. '</answer>' as its 3 BPE tokens).
  # Normalised to a tuple of id tuples.
  stop_ids: tuple[int | tuple[int, ...], ...] = ()
  pad_id: int = 0  # written after a row ends
  # Also record, per token, the K most likely next tokens and their log-probs under the
  # model's own distribution log_softmax(logits) (temperature 1, untruncated): a teacher's
  # targets for logit distillation. 0 = off (Rollout.top_ids / top_logprobs are None).
  record_top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0 or self.max_new_tokens < 1 or self.record_top_k < 0:
      raise ValueError("top_k and record_top_k must be >= 0 and max_new_tokens >= 1")
    seqs = tuple((int(x),) if np.ndim(x) == 0 else tuple(int(i) for i in x)
                 for x in self.stop_ids)
    if any(not q or min(q) < 0 for q in seqs):
      raise ValueError(f"stop sequences must be non-empty and of token ids >= 0: {seqs}")
    object.__setattr__(self, "stop_ids", seqs)


def keep_rows(r: Rollout, prompts: int, group: int) -> Rollout:
  """The first `prompts` prompts' rows of a (host) rollout: drops a padded batch's filler."""
  n = prompts * group
  cut = lambda x, rows: None if x is None else x[:rows]
  return Rollout(cut(r.tokens, n), cut(r.mask, n), cut(r.logprobs, n), cut(r.stop_reason, n),
                 cut(r.prompt_tokens, prompts), cut(r.prompt_mask, prompts), r.steps,
                 cut(r.top_ids, n), cut(r.top_logprobs, n))


def stop_token_ids(tokenizer, stop: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Each stop string as the id sequence the decode loop watches for.

  A string is matched exactly as its standalone encoding, and must round-trip
  through the tokenizer, or it could never be matched. A tokenizer may encode
  the string differently in context (BPE merging it with the text before or
  after it, sentencepiece's word-initial '▁' pieces); such a completion runs
  on to EOS or its budget, and the graders still see the stop string. List
  the usual variants (e.g. stages.rl.ANSWER_STOPS) to catch more.
  """
  out = []
  for s in stop:
    single = tokenizer.token_id(s)
    ids = [single] if single is not None else tokenizer.encode(s)
    if not ids or tokenizer.decode(ids) != s:
      raise ValueError(f"stop string {s!r} does not round-trip through the tokenizer "
                       f"(encodes to {ids})")
    out.append(tuple(int(i) for i in ids))
  return tuple(out)


def bucket_length(n: int, min_bucket: int = 16) -> int:
  """Prompt length bucket: the next power of two, at least `min_bucket`."""
  return max(min_bucket, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """(tokens_BxS, mask_BxS) with each prompt right-aligned."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, length - len(p):] = p
      mask[i, length - len(p):] = True
  return tokens, mask


class Sampler:
  """Host front end: pads and buckets prompts, runs the decode segments, shards on a mesh.

  `window`: the first cache window past the prompt (then doubled as steps fill it).
  `min_rows`: decode compacts live rows into row buckets N, N/2, ... no smaller than this
  (0 = never compact). Each (rows, window) pair met compiles once.
  """

  def __init__(self, cfg: ModelConfig, mesh: Mesh | None = None, *,
               max_prompt_len: int = 1024, min_bucket: int = 16, window: int = 128,
               min_rows: int = 8):
    self.cfg, self.mesh = cfg, mesh
    self.max_prompt_len, self.min_bucket = max_prompt_len, min_bucket
    self.window, self.min_rows = window, min_rows
    self._fns: dict = {}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      self._slot_multiple = decode_attention.slot_multiple(cfg.attention)

  def _round(self, slots: int) -> int:
    """A cache's slot count as the decode kernel reads it (whole blocks), else as is."""
    return -(-slots // self._slot_multiple) * self._slot_multiple

  def _check(self, prompts, sp: SamplingParams) -> int:
    if not prompts:
      raise ValueError("no prompts to sample from")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty: at least one token is needed")
      if len(p) > self.max_prompt_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens, over max_prompt_len="
                         f"{self.max_prompt_len}")
      bad = [int(x) for x in p if not 0 <= int(x) < self.cfg.vocab_size]
      if bad:
        raise ValueError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
    s = min(bucket_length(max(map(len, prompts)), self.min_bucket),
            max(self.max_prompt_len, max(map(len, prompts))))
    if s + sp.max_new_tokens > self.cfg.max_position:
      raise ValueError(f"prompt bucket {s} + max_new_tokens {sp.max_new_tokens} exceeds the "
                       f"model's max_position {self.cfg.max_position}")
    return s

  def _jit(self, key, fn, donate=(), lay_out=True):
    """fn jitted once per key; on a mesh its DecodeState output is laid out row-sharded.

    A decode program (`lay_out`) is shared by every sampler of this process with the same
    model config, mesh and window (`_DECODE_PROGRAMS`): a pipeline's stages, each with its
    own sampler, trace and compile the prefill / segment / resize programs once.
    """
    if key not in self._fns:
      if not lay_out:
        self._fns[key] = jax.jit(fn, donate_argnums=donate)
      else:
        shared = (self.cfg, self.mesh, self.window, key, donate)
        if shared not in _DECODE_PROGRAMS:
          _DECODE_PROGRAMS[shared] = (jax.jit(fn, donate_argnums=donate) if self.mesh is None
                                      else _ShardedDecodeFn(fn, self.mesh, donate))
        self._fns[key] = _Counted(_DECODE_PROGRAMS[shared])
    return self._fns[key]

  def compilations(self) -> int:
    """Programs this sampler has needed (its compilations in a fresh process; tests check
    that buckets bound this)."""
    return sum(fn._cache_size() for fn in self._fns.values())

  def _global_rows(self, inputs: tuple, prompts: int) -> tuple:
    """Several processes: each feeds its own prompts, the rows of the global batch on its
    devices (multihost.to_global); the output rows stay where their prompts were, so each
    host reads back its own samples (`multihost.host_rows`)."""
    if self.mesh is None:
      raise ValueError("sampling in several processes needs a mesh over their devices")
    multihost.same_shape_everywhere("prompts per process", (prompts,))
    count = jax.process_count()
    return multihost.to_global(inputs, tuple(
        sharding_lib.batch_sharding(self.mesh, (x.shape[0] * count, *x.shape[1:]))
        for x in inputs))

  def _row_shards(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def decode_weights(self, params):
    """The weights as this sampler's decode reads them (`decode_layout`). Params on the same
    devices as its mesh, in the same order, in any layout (the trainer's, where
    `sharding.regroup` groups the chips otherwise), are moved and laid out by one program
    (`layout_program`); params elsewhere (host arrays, other devices or order) are put on
    the mesh first."""
    fuse = self.mesh is None or self.mesh.shape["tensor"] == 1
    if self.mesh is None:
      return self._jit(("fuse", fuse), lambda p: decode_layout(p, self.cfg, fuse),
                       lay_out=False)(params)
    order = list(self.mesh.devices.flat)  # one program needs the same devices, in order
    if not all(isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding)
               and list(a.sharding.mesh.devices.flat) == order
               for a in jax.tree.leaves(params)):
      params = jax.device_put(params, sharding_lib.tree_shardings(
          model_lib.param_axes(self.cfg), params, self.mesh))
    # A fresh program per sampler: `compilations()` counts this sampler's programs only.
    if ("layout", fuse) not in self._fns:
      self._fns[("layout", fuse)] = layout_program(self.cfg, params, self.mesh)
    return self._fns[("layout", fuse)](params)

  def generate(self, params, prompts: Sequence[Sequence[int]], sp: SamplingParams,
               key: jax.Array, group: int = 1,
               max_new_tokens: Sequence[int] | None = None) -> Rollout:
    """Samples `group` completions per prompt; returns a Rollout of device arrays.

    `max_new_tokens` optionally gives each prompt its own budget (<= sp.max_new_tokens).
    """
    s = multihost.max_over_processes(self._check(prompts, sp))
    b = len(prompts)
    tokens, mask = left_pad(prompts, s, sp.pad_id)
    budget = np.full((b,), sp.max_new_tokens, np.int32)
    if max_new_tokens is not None:
      if len(max_new_tokens) != b:
        raise ValueError(f"{len(max_new_tokens)} budgets for {b} prompts")
      budget = np.minimum(np.asarray(max_new_tokens, np.int32), sp.max_new_tokens)
    inputs = (tokens, mask, np.repeat(budget, group))
    if jax.process_count() > 1:  # this host's prompts: its block of the global batch
      inputs, b = self._global_rows(inputs, b), b * jax.process_count()
    n, t_max, cfg = b * group, sp.max_new_tokens, self.cfg
    params = self.decode_weights(params)
    slots = self._round(s + min(t_max, self.window))
    st = self._jit(("prefill", b, s, sp, group), functools.partial(
        decode.prefill, cfg=cfg, sp=sp, group=group, window=slots - s))(params, *inputs)
    buckets = (decode.row_buckets(n, self._row_shards(), self.min_rows) if self.min_rows
               else (n,))
    rows = n
    while True:
      run = self._jit(("segment", rows, slots, sp),
                      functools.partial(decode.segment, cfg=cfg, sp=sp), donate=(1,))
      st, live = run(params, st, key, np.int32(min(t_max, slots - s)),
                     np.int32(decode.next_floor(rows, buckets)))
      live, t = map(int, jax.device_get((live, st.t)))
      if live == 0 or t >= t_max:
        return st.out
      new_rows, new_slots = decode.next_shape(live, t, rows, slots, s, buckets, self.window, t_max)
      new_slots = self._round(new_slots)
      st = self._jit(("resize", rows, slots, new_rows, new_slots), functools.partial(
          decode.resize, rows=new_rows, slots=new_slots))(st)
      rows, slots = new_rows, new_slots


def decode_layout(params, cfg: ModelConfig, fuse: bool):
  """The weights as decode reads them: in the compute dtype (the model casts them to it
  anyway, so f32 master weights decode as bf16 at half the bytes), the q/k/v and gate/up
  projections fused into one matmul each (`fuse`), or the layers split for a tensor-parallel
  mesh (each slice keeps its stacked array's layout)."""
  params = jax.tree.map(lambda a: a.astype(cfg.compute_dtype), params)
  return model_lib.fuse_projections(params) if fuse else model_lib.split_layers(params)


def decode_axes(cfg: ModelConfig, fuse: bool):
  """Logical axes of `decode_layout`'s output: one dict a layer, q|k|v and gate|up fused."""
  axes = model_lib.param_axes(cfg)
  layer = {name: P(*spec[1:]) for name, spec in axes["layers"].items()}
  if fuse:  # a mesh without tensor parallelism: the fused axes stay whole
    layer = {n: a for n, a in layer.items() if n not in ("q", "k", "v", "gate", "up")}
    layer.update(qkv=P("embed", None), gate_up=P("embed", None))
  return {**axes, "layers": (layer,) * cfg.layers}


def layout_program(cfg: ModelConfig, params, mesh: Mesh):
  """One jitted program from params in any layout on the mesh's devices (the trainer's) to
  `decode_layout` on `mesh`, the sampler's: the reshard and the cast in one step. The
  two meshes must order the same devices alike (`sharding.regroup` does)."""
  fuse = mesh.shape["tensor"] == 1
  layout = functools.partial(decode_layout, cfg=cfg, fuse=fuse)
  out = sharding_lib.tree_shardings(decode_axes(cfg, fuse), jax.eval_shape(layout, params),
                                    mesh)
  return jax.jit(layout, out_shardings=out)


def decode_shardings(shapes, mesh: Mesh):
  """Shardings of decode outputs (a DecodeState or arrays) on the mesh: the cache by
  `cache_shardings`, every other array by rows, scalars replicated."""
  rows = lambda a: (sharding_lib.batch_sharding(mesh, a.shape) if a.ndim
                    else sharding_lib.replicated(mesh))

  def lay(x):
    if isinstance(x, decode.DecodeState):
      return dataclasses.replace(jax.tree.map(rows, dataclasses.replace(x, cache=None)),
                                 cache=sharding_lib.cache_shardings(x.cache, mesh))
    return rows(x)
  return jax.tree.map(lay, shapes, is_leaf=lambda x: isinstance(x, decode.DecodeState))


# (model config, mesh, window, program key, donated args) -> a decode program, process-wide.
_DECODE_PROGRAMS: dict = {}


def _signature(args) -> tuple:
  return jax.tree.structure(args), tuple(getattr(a, "shape", None) for a in jax.tree.leaves(args))


class _Counted:
  """A shared decode program as one sampler calls it: counts the argument signatures it
  has passed, the executables a fresh process would have compiled for it."""

  def __init__(self, program):
    self.program, self._seen = program, set()

  def __call__(self, *args):
    self._seen.add(_signature(args))
    return self.program(*args)

  def _cache_size(self) -> int:
    return len(self._seen)


class _ShardedDecodeFn:
  """jit with the DecodeState output laid out on the mesh (`decode_shardings`), run with the
  mesh as context mesh: a fused attention kernel (prefill, decode steps) shard_maps over it."""

  def __init__(self, fn, mesh: Mesh, donate):
    self.fn, self.mesh, self.donate = fn, mesh, donate
    self._jitted: dict = {}

  def __call__(self, *args):
    key = _signature(args)
    if key not in self._jitted:
      shapes = jax.eval_shape(self.fn, *args)
      self._jitted[key] = sharding_lib.MeshJit(jax.jit(
          self.fn, donate_argnums=self.donate,
          out_shardings=decode_shardings(shapes, self.mesh)), self.mesh)
    return self._jitted[key](*args)

  def _cache_size(self) -> int:
    return sum(f.jitted._cache_size() for f in self._jitted.values())
