"""Jitted KV-cache sampler: prefill once, decode G samples per prompt in one while_loop.

1. Prompts are left-padded to a length bucket (powers of two), so a stream of
   varied prompts compiles once per (batch, bucket, max_new_tokens, params).
2. Prefill runs on the B prompts only; its cache is repeated G times into a
   pre-allocated N = B·G cache, which is donated between calls.
3. Decode is one `lax.while_loop`: sample, record, feed the token back; it
   ends when every row has hit EOS, a stop sequence (one or more token ids,
   matched on the row's last tokens) or its own token budget.
4. Log-probs are those of the sampled token under the *untruncated*
   temperature-scaled distribution, log_softmax(logits / temperature): the
   policy the GRPO trainer differentiates, so sampler and trainer agree
   exactly. top-k / top-p only restrict which tokens can be drawn. Greedy
   (temperature 0) reports log_softmax(logits).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax.core import model as model_lib
from r1jax.core import sharding as sharding_lib
from r1jax.core.config import ModelConfig

STOP_LENGTH, STOP_EOS, STOP_STOP = 0, 1, 2
STOP_REASONS = ("length", "eos", "stop")
_ANY = -2  # stop-table padding: matches any token


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

  def stop_table(self) -> np.ndarray:
    """(num_stops, L) int32, each sequence right-aligned, -2 = any token before it."""
    seqs = self.stop_ids or ((-1,),)  # -1 never matches: no stops
    table = np.full((len(seqs), max(map(len, seqs))), _ANY, np.int32)
    for i, q in enumerate(seqs):
      table[i, table.shape[1] - len(q):] = q
    return table


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
  """Sampler output for N = B·G rows (row i is a sample of prompt i // G)."""

  tokens: jax.Array  # (N, T) int32 completion tokens, pad_id after the end
  mask: jax.Array  # (N, T) bool: real completion tokens (the EOS/stop token included)
  logprobs: jax.Array  # (N, T) f32 log p(token) under log_softmax(logits / temperature)
  stop_reason: jax.Array  # (N,) int32: STOP_LENGTH / STOP_EOS / STOP_STOP
  prompt_tokens: jax.Array  # (B, S) int32 left-padded prompts as sampled
  prompt_mask: jax.Array  # (B, S) bool
  steps: jax.Array  # () int32 decode iterations run (< T when every row stopped early)
  top_ids: jax.Array | None = None  # (N, T, K) int32 with SamplingParams.record_top_k = K
  top_logprobs: jax.Array | None = None  # (N, T, K) f32 log_softmax(logits) of top_ids

  @property
  def lengths(self):
    return self.mask.sum(-1)


def filter_logits(logits_NxV: jax.Array, sp: SamplingParams) -> jax.Array:
  """Temperature-scaled logits with tokens outside top-k / the nucleus set to -inf."""
  x_NxV = logits_NxV / sp.temperature
  if sp.top_k:
    kth_Nx1 = jax.lax.top_k(x_NxV, sp.top_k)[0][:, -1:]
    x_NxV = jnp.where(x_NxV < kth_Nx1, -jnp.inf, x_NxV)
  if sp.top_p < 1.0:
    # Keep the smallest prefix (by probability) whose mass reaches top_p: a
    # token is kept iff the mass strictly before it is < top_p.
    order_NxV = jnp.argsort(-x_NxV, axis=-1)
    sorted_NxV = jnp.take_along_axis(x_NxV, order_NxV, axis=-1)
    p_NxV = jax.nn.softmax(sorted_NxV, axis=-1)
    keep_sorted_NxV = (jnp.cumsum(p_NxV, axis=-1) - p_NxV) < sp.top_p
    keep_NxV = jnp.zeros_like(keep_sorted_NxV).at[
        jnp.arange(x_NxV.shape[0])[:, None], order_NxV].set(keep_sorted_NxV)
    x_NxV = jnp.where(keep_NxV, x_NxV, -jnp.inf)
  return x_NxV


def inverse_cdf_sample(x_NxV: jax.Array, key: jax.Array) -> jax.Array:
  """One draw per row from softmax(x) by inverting its CDF.

  One uniform per row instead of Gumbel-max's one per vocabulary entry (4x
  cheaper per decode step on CPU). u lies in (0, total], and a token is chosen
  iff cdf[i-1] < u <= cdf[i], so tokens of zero probability (-inf logits,
  e.g. outside the nucleus) are never drawn.
  """
  e_NxV = jnp.exp(x_NxV - jnp.max(x_NxV, axis=-1, keepdims=True))
  cdf_NxV = jnp.cumsum(e_NxV, axis=-1)
  u_Nx1 = (1.0 - jax.random.uniform(key, (x_NxV.shape[0], 1))) * cdf_NxV[:, -1:]
  tok_N = jnp.sum(cdf_NxV < u_Nx1, axis=-1, dtype=jnp.int32)
  return jnp.minimum(tok_N, x_NxV.shape[-1] - 1)


def _draw(logits_NxV, key, sp: SamplingParams):
  """(token_N, logprob_N) for one decode step."""
  if sp.temperature == 0:
    tok_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  else:
    tok_N = inverse_cdf_sample(filter_logits(logits_NxV, sp), key)
    logp_NxV = jax.nn.log_softmax(logits_NxV / sp.temperature, axis=-1)
  return tok_N, jnp.take_along_axis(logp_NxV, tok_N[:, None], axis=-1)[:, 0]


def _generate(params, prompt_BxS, pmask_BxS, max_new_N, key, cache, *, cfg: ModelConfig,
              sp: SamplingParams, group: int, fuse: bool = True):
  """Pure prefill + decode loop; returns (Rollout, cache) with `cache` reused in place."""
  b, s = prompt_BxS.shape
  n, t_max = b * group, sp.max_new_tokens
  # 1. Prefill the B prompts, then repeat rows into the donated N-row cache.
  # Once, outside the decode loop: per-layer weights, q|k|v and gate|up fused
  # into wide matmuls unless tensor parallelism splits their heads / mlp axes.
  params = model_lib.fuse_projections(params) if fuse else model_lib.split_layers(params)
  pre = model_lib.init_cache(cfg, b, s)
  logits_BxSxV, pre = model_lib.forward_cached(params, prompt_BxS, cfg, pre, mask_BxT=pmask_BxS)
  fill = lambda axis: lambda big, small: jax.lax.dynamic_update_slice_in_dim(
      big, jnp.repeat(small, group, axis=0), 0, axis=axis)
  cache = model_lib.KVCache(
      k=tuple(map(fill(2), cache.k, pre.k)), v=tuple(map(fill(3), cache.v, pre.v)),
      valid=jnp.zeros_like(cache.valid).at[:, :s].set(jnp.repeat(pmask_BxS, group, axis=0)),
      index=jnp.asarray(s, jnp.int32))
  logits_NxV = jnp.repeat(logits_BxSxV[:, -1], group, axis=0)
  stops_QxL = jnp.asarray(sp.stop_table())

  def cond(state):
    t, done_N = state[0], state[6]
    return (t < t_max) & ~jnp.all(done_N)

  def body(state):
    (t, cache, logits_NxV, toks_NxT, logp_NxT, live_NxT, done_N, reason_N, recent_NxL,
     top) = state
    tok_N, lp_N = _draw(logits_NxV, jax.random.fold_in(key, t), sp)
    live_N = ~done_N
    if sp.record_top_k:
      vals_NxK, ids_NxK = jax.lax.top_k(jax.nn.log_softmax(logits_NxV, axis=-1), sp.record_top_k)
      top = (top[0].at[:, t].set(jnp.where(live_N[:, None], ids_NxK, sp.pad_id)),
             top[1].at[:, t].set(jnp.where(live_N[:, None], vals_NxK, 0.0)))
    tok_N = jnp.where(live_N, tok_N, sp.pad_id)
    toks_NxT = toks_NxT.at[:, t].set(tok_N)
    logp_NxT = logp_NxT.at[:, t].set(jnp.where(live_N, lp_N, 0.0))
    live_NxT = live_NxT.at[:, t].set(live_N)
    is_eos_N = live_N & (tok_N == (-1 if sp.eos_id is None else sp.eos_id))
    # The last L completion tokens (-1 before the first), against each stop sequence.
    recent_NxL = jnp.concatenate([recent_NxL[:, 1:], tok_N[:, None]], axis=1)
    hit_NxQxL = (recent_NxL[:, None] == stops_QxL[None]) | (stops_QxL[None] == _ANY)
    is_stop_N = live_N & ~is_eos_N & jnp.any(jnp.all(hit_NxQxL, axis=-1), axis=-1)
    out_of_budget_N = live_N & (t + 1 >= max_new_N)
    reason_N = jnp.where(is_eos_N, STOP_EOS, jnp.where(is_stop_N, STOP_STOP, reason_N))
    done_N = done_N | is_eos_N | is_stop_N | out_of_budget_N
    # Feed the token back; a finished row's slot is marked invalid.
    logits_Nx1xV, cache = model_lib.forward_cached(params, tok_N[:, None], cfg, cache,
                                                   mask_BxT=live_N[:, None])
    return (t + 1, cache, logits_Nx1xV[:, 0], toks_NxT, logp_NxT, live_NxT, done_N, reason_N,
            recent_NxL, top)

  k_rec = sp.record_top_k
  top = ((jnp.full((n, t_max, k_rec), sp.pad_id, jnp.int32),
          jnp.zeros((n, t_max, k_rec), jnp.float32)) if k_rec else ())
  state = (jnp.int32(0), cache, logits_NxV,
           jnp.full((n, t_max), sp.pad_id, jnp.int32), jnp.zeros((n, t_max), jnp.float32),
           jnp.zeros((n, t_max), bool), max_new_N <= 0, jnp.full((n,), STOP_LENGTH, jnp.int32),
           jnp.full((n, stops_QxL.shape[1]), -1, jnp.int32), top)
  steps, cache, _, toks_NxT, logp_NxT, live_NxT, _, reason_N, _, top = jax.lax.while_loop(
      cond, body, state)
  return Rollout(toks_NxT, live_NxT, logp_NxT, reason_N, prompt_BxS, pmask_BxS, steps,
                 *(top or (None, None))), cache


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
  """Host front end: pads and buckets prompts, keeps donated caches, shards on a mesh."""

  def __init__(self, cfg: ModelConfig, mesh: Mesh | None = None, *,
               max_prompt_len: int = 1024, min_bucket: int = 16):
    self.cfg, self.mesh = cfg, mesh
    self.max_prompt_len, self.min_bucket = max_prompt_len, min_bucket
    self._fns: dict = {}
    self._caches: dict = {}

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

  def _compiled(self, b: int, s: int, sp: SamplingParams, group: int, params):
    key = (b, s, sp, group)
    if key not in self._fns:
      fuse = self.mesh is None or self.mesh.shape["tensor"] == 1
      fn = lambda *a: _generate(*a, cfg=self.cfg, sp=sp, group=group, fuse=fuse)
      if self.mesh is None:
        self._fns[key] = jax.jit(fn, donate_argnums=(5,))
      else:
        m = self.mesh
        cache = jax.eval_shape(lambda: model_lib.init_cache(self.cfg, b * group,
                                                            s + sp.max_new_tokens))
        cache_sh = sharding_lib.cache_shardings(cache, m)
        rows = lambda shape: sharding_lib.batch_sharding(m, shape)
        n, t = b * group, sp.max_new_tokens
        k_rec = sp.record_top_k
        top = (rows((n, t, k_rec)), rows((n, t, k_rec))) if k_rec else (None, None)
        out = Rollout(rows((n, t)), rows((n, t)), rows((n, t)), rows((n,)), rows((b, s)),
                      rows((b, s)), NamedSharding(m, P()), *top)
        self._fns[key] = jax.jit(
            fn, donate_argnums=(5,),
            in_shardings=(jax.tree.map(lambda a: a.sharding, params), rows((b, s)),
                          rows((b, s)), rows((n,)), NamedSharding(m, P()), cache_sh),
            out_shardings=(out, cache_sh))
    return self._fns[key]

  def _cache(self, n: int, length: int, params):
    key = (n, length)
    if key not in self._caches:
      make = lambda: model_lib.init_cache(self.cfg, n, length)
      if self.mesh is None:
        # Committed to the params' device, exactly like the cache the call
        # returns, so the second call reuses the first call's executable.
        device = next(iter(jax.tree.leaves(params)[0].devices()))
        shardings = jax.sharding.SingleDeviceSharding(device)
      else:
        shardings = sharding_lib.cache_shardings(jax.eval_shape(make), self.mesh)
      self._caches[key] = jax.jit(make, out_shardings=shardings)()
    return self._caches.pop(key)

  def compilations(self) -> int:
    """Executables compiled so far (tests check that buckets bound this)."""
    return sum(fn._cache_size() for fn in self._fns.values())

  def generate(self, params, prompts: Sequence[Sequence[int]], sp: SamplingParams,
               key: jax.Array, group: int = 1,
               max_new_tokens: Sequence[int] | None = None) -> Rollout:
    """Samples `group` completions per prompt; returns a Rollout of device arrays.

    `max_new_tokens` optionally gives each prompt its own budget (<= sp.max_new_tokens).
    """
    s = self._check(prompts, sp)
    b = len(prompts)
    tokens, mask = left_pad(prompts, s, sp.pad_id)
    budget = np.full((b,), sp.max_new_tokens, np.int32)
    if max_new_tokens is not None:
      if len(max_new_tokens) != b:
        raise ValueError(f"{len(max_new_tokens)} budgets for {b} prompts")
      budget = np.minimum(np.asarray(max_new_tokens, np.int32), sp.max_new_tokens)
    fn = self._compiled(b, s, sp, group, params)
    cache = self._cache(b * group, s + sp.max_new_tokens, params)
    rollout, cache = fn(params, tokens, mask, np.repeat(budget, group), key, cache)
    self._caches[(b * group, s + sp.max_new_tokens)] = cache
    return rollout

  def generate_many(self, params, prompts: Sequence[Sequence[int]], sp: SamplingParams,
                    key: jax.Array, batch_size: int, group: int = 1,
                    progress: bool = True) -> list[Rollout]:
    """Samples prompts in fixed-size batches (the last one padded), with a progress line."""
    out, start, done_tokens = [], time.perf_counter(), 0
    batches = range(0, len(prompts), batch_size)
    for i, lo in enumerate(batches):
      chunk = list(prompts[lo:lo + batch_size])
      real = len(chunk)
      chunk += [chunk[0]] * (batch_size - real)  # same shape -> no recompilation
      r = self.generate(params, chunk, sp, jax.random.fold_in(key, i), group)
      out.append(keep_rows(jax.device_get(r), real, group))
      done_tokens += int(out[-1].mask.sum())
      if progress:
        rate = done_tokens / max(time.perf_counter() - start, 1e-9)
        print(f"\rsampling: batch {i + 1}/{len(batches)}, {done_tokens} tokens, "
              f"{rate:.0f} tok/s", end="\n" if i + 1 == len(batches) else "",
              file=sys.stderr, flush=True)
    return out
