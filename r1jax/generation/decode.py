"""The sampler's device side: prefill, decode segments that follow the live rows, compaction.

A rollout's cost should track the tokens that exist. R1's completions are long and
heavy-tailed: a few rows run to the budget while most end early, so a lockstep loop over
all N rows and the whole cache spends most of its work on finished rows and empty slots.
Decode therefore runs in segments, each a `lax.while_loop` of static shape:

- O slots (rows still decoding come first) over a cache of X slots. A segment ends when
  the live rows fit in the next smaller row bucket, when the step count reaches the
  cache's end, or when every row is done.
- Between segments, `resize` gathers the live rows into fewer slots (compaction) and/or
  moves the cache into a longer window, so attention reads only the filled part (plus
  the rest of its window).

Draws do not depend on the layout: step t draws the same N uniforms as an uncompacted
loop, and each slot takes its own row's. Log-probs are those of the sampled token under
log_softmax(logits / temperature), the policy the trainer differentiates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.core import model as model_lib
from r1jax.core.config import ModelConfig

STOP_LENGTH, STOP_EOS, STOP_STOP = 0, 1, 2
STOP_REASONS = ("length", "eos", "stop")
ANY_TOKEN = -2  # stop-table padding: matches any token


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
  top_ids: jax.Array | None = None  # (N, T, k) int32 with SamplingParams.record_top_k = k
  top_logprobs: jax.Array | None = None  # (N, T, k) f32 log_softmax(logits) of top_ids

  @property
  def lengths(self):
    return self.mask.sum(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Decode between segments: O slots over an X-slot cache, writing into N-row outputs."""

  t: jax.Array  # () int32 steps run
  cache: model_lib.KVCache  # O rows x X slots
  logits_OxV: jax.Array  # f32 next-token logits of each slot
  row_O: jax.Array  # int32 output row of each slot
  done_O: jax.Array  # bool: the slot's row has ended (or never started: budget 0)
  budget_O: jax.Array  # int32 the slot's token budget
  # (O, longest stop) int32: the slot's last tokens (-1 before the first), for stops
  recent: jax.Array
  out: Rollout  # N-row outputs; prompts as sampled


def filter_logits(logits_NxV: jax.Array, sp) -> jax.Array:
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


def inverse_cdf(x_NxV: jax.Array, uniform_Nx1: jax.Array) -> jax.Array:
  """The token whose CDF interval holds each row's uniform in [0, 1).

  One uniform per row instead of Gumbel-max's one per vocabulary entry (4x
  cheaper per decode step on CPU). u lies in (0, total], and a token is chosen
  iff cdf[i-1] < u <= cdf[i], so tokens of zero probability (-inf logits,
  e.g. outside the nucleus) are never drawn.
  """
  e_NxV = jnp.exp(x_NxV - jnp.max(x_NxV, axis=-1, keepdims=True))
  cdf_NxV = jnp.cumsum(e_NxV, axis=-1)
  u_Nx1 = (1.0 - uniform_Nx1) * cdf_NxV[:, -1:]
  tok_N = jnp.sum(cdf_NxV < u_Nx1, axis=-1, dtype=jnp.int32)
  return jnp.minimum(tok_N, x_NxV.shape[-1] - 1)


def draw(logits_OxV, uniform_Ox1, sp):
  """(token_O, logprob_O) for one decode step."""
  if sp.temperature == 0:
    tok_O = jnp.argmax(logits_OxV, axis=-1).astype(jnp.int32)
    logp_OxV = jax.nn.log_softmax(logits_OxV, axis=-1)
  else:
    tok_O = inverse_cdf(filter_logits(logits_OxV, sp), uniform_Ox1)
    logp_OxV = jax.nn.log_softmax(logits_OxV / sp.temperature, axis=-1)
  return tok_O, jnp.take_along_axis(logp_OxV, tok_O[:, None], axis=-1)[:, 0]


def prefill(params, prompt_BxS, pmask_BxS, budget_N, *, cfg: ModelConfig, sp, group: int,
            window: int) -> DecodeState:
  """The B prompts through the model once; their cache repeated G times into N rows of
  S + `window` slots; every row live unless its budget is 0."""
  b, s = prompt_BxS.shape
  n, t_max = b * group, sp.max_new_tokens
  pre = model_lib.init_cache(cfg, b, s)
  h_BxSxD, pre = model_lib.hidden_states_cached(params, prompt_BxS, cfg, pre, pmask_BxS,
                                                 fresh=True)
  # Only the last position's logits: (B, S, V) of them would be the prefill's largest array.
  logits_BxV = model_lib.unembed(params, h_BxSxD[:, -1:], cfg)[:, 0]
  rep = lambda x: jnp.repeat(x, group, axis=0)
  grow = lambda x, axis: jnp.pad(rep(x), [(0, window if a == axis else 0)
                                          for a in range(x.ndim)])
  cache = model_lib.KVCache(k=tuple(grow(k, 3) for k in pre.k),
                            v=tuple(grow(v, 2) for v in pre.v),
                            valid=grow(pmask_BxS, 1), index=jnp.asarray(s, jnp.int32))
  k_rec = sp.record_top_k
  top = ((jnp.full((n, t_max, k_rec), sp.pad_id, jnp.int32),
          jnp.zeros((n, t_max, k_rec), jnp.float32)) if k_rec else (None, None))
  out = Rollout(jnp.full((n, t_max), sp.pad_id, jnp.int32), jnp.zeros((n, t_max), bool),
                jnp.zeros((n, t_max), jnp.float32), jnp.full((n,), STOP_LENGTH, jnp.int32),
                prompt_BxS, pmask_BxS, jnp.int32(0), *top)
  stops = stop_table(sp.stop_ids).shape[1]
  return DecodeState(jnp.int32(0), cache, rep(logits_BxV), jnp.arange(n, dtype=jnp.int32),
                     budget_N <= 0, budget_N, jnp.full((n, stops), -1, jnp.int32), out)


def segment(params, st: DecodeState, key, t_end, floor, *, cfg: ModelConfig,
            sp) -> tuple[DecodeState, jax.Array]:
  """Decode steps until t = t_end, every row is done, or at most `floor` rows are live.

  Returns the state and its live-row count.
  """
  stops = jnp.asarray(stop_table(sp.stop_ids))  # (stop sequences, longest stop)
  n = st.out.tokens.shape[0]
  eos = -1 if sp.eos_id is None else sp.eos_id

  def cond(st):
    live = jnp.sum(~st.done_O)
    return (st.t < t_end) & (live > 0) & (live > floor)

  def body(st):
    t, out = st.t, st.out
    uniform_Ox1 = (None if sp.temperature == 0 else  # greedy draws nothing
                   jax.random.uniform(jax.random.fold_in(key, t), (n, 1))[st.row_O])
    tok_O, lp_O = draw(st.logits_OxV, uniform_Ox1, sp)
    live_O = ~st.done_O
    top_ids, top_lp = out.top_ids, out.top_logprobs
    if sp.record_top_k:
      vals_Oxk, ids_Oxk = jax.lax.top_k(jax.nn.log_softmax(st.logits_OxV, axis=-1),
                                        sp.record_top_k)
      top_ids = top_ids.at[st.row_O, t].set(jnp.where(live_O[:, None], ids_Oxk, sp.pad_id))
      top_lp = top_lp.at[st.row_O, t].set(jnp.where(live_O[:, None], vals_Oxk, 0.0))
    tok_O = jnp.where(live_O, tok_O, sp.pad_id)
    is_eos_O = live_O & (tok_O == eos)
    # Each slot's last completion tokens, against each stop sequence: hit is
    # (slots, stop sequences, longest stop).
    recent = jnp.concatenate([st.recent[:, 1:], tok_O[:, None]], axis=1)
    hit = (recent[:, None] == stops[None]) | (stops[None] == ANY_TOKEN)
    is_stop_O = live_O & ~is_eos_O & jnp.any(jnp.all(hit, axis=-1), axis=-1)
    out_of_budget_O = live_O & (t + 1 >= st.budget_O)
    reason_O = jnp.where(is_eos_O, STOP_EOS, jnp.where(is_stop_O, STOP_STOP, STOP_LENGTH))
    # Finished slots write pad / 0 / False past their row's end, and only live slots
    # set a stop reason: a slot never overwrites what its row already holds.
    out = dataclasses.replace(
        out, tokens=out.tokens.at[st.row_O, t].set(tok_O),
        logprobs=out.logprobs.at[st.row_O, t].set(jnp.where(live_O, lp_O, 0.0)),
        mask=out.mask.at[st.row_O, t].set(live_O),
        stop_reason=out.stop_reason.at[st.row_O].set(
            jnp.where(live_O, reason_O, out.stop_reason[st.row_O])),
        top_ids=top_ids, top_logprobs=top_lp)
    # Feed the token back; a finished row's slot is marked invalid.
    logits_Ox1xV, cache = model_lib.forward_cached(params, tok_O[:, None], cfg, st.cache,
                                                   mask_BxT=live_O[:, None])
    return DecodeState(t + 1, cache, logits_Ox1xV[:, 0], st.row_O,
                       st.done_O | is_eos_O | is_stop_O | out_of_budget_O, st.budget_O,
                       recent, out)

  st = jax.lax.while_loop(cond, body, st)
  st = dataclasses.replace(st, out=dataclasses.replace(st.out, steps=st.t))
  return st, jnp.sum(~st.done_O)


def resize(st: DecodeState, *, rows: int, slots: int) -> DecodeState:
  """The live rows gathered into the first of `rows` slots, the cache moved into `slots`
  (>= its current length). Live rows keep their order; finished ones fill the rest."""
  order = jnp.argsort(st.done_O, stable=True)[:rows]
  take = lambda x: x[order]
  grow = lambda x, axis: jnp.pad(take(x), [(0, slots - x.shape[axis] if a == axis else 0)
                                           for a in range(x.ndim)])
  c = st.cache
  cache = model_lib.KVCache(k=tuple(grow(k, 3) for k in c.k), v=tuple(grow(v, 2) for v in c.v),
                            valid=grow(c.valid, 1), index=c.index)
  return DecodeState(st.t, cache, take(st.logits_OxV), take(st.row_O), take(st.done_O),
                     take(st.budget_O), take(st.recent), st.out)


def row_buckets(n: int, shards: int, smallest: int) -> tuple[int, ...]:
  """Slot counts decode may shrink through: n, then each halving of it and three quarters of
  each halving (n, ¾n, ½n, ⅜n, ¼n, …), where one is a whole number, a multiple of `shards`
  (the data-parallel devices) and at least `smallest`. The quarter steps keep a segment's
  slots within a third of its live rows where halving alone would run up to twice as many."""
  levels = [n]
  while levels[-1] % 2 == 0 and levels[-1] // 2 >= smallest:
    levels.append(levels[-1] // 2)
  quarters = [3 * x // 4 for x in levels if (3 * x) % 4 == 0]
  keep = {x for x in levels + quarters if x == n or (x % shards == 0 and x >= smallest)}
  return tuple(sorted(keep, reverse=True))


def next_shape(live: int, t: int, rows: int, slots: int, prompt: int, buckets: tuple[int, ...],
         window: int, t_max: int) -> tuple[int, int]:
  """(rows, slots) for the next segment: the smallest row bucket holding the live rows,
  and the cache doubled (up to prompt + t_max) once the steps have filled it."""
  rows = min(b for b in buckets if b >= live)
  if t >= slots - prompt:
    slots = prompt + min(t_max, max(window, 2 * (slots - prompt)))
  return rows, slots


def next_floor(rows: int, buckets: tuple[int, ...]) -> int:
  """A segment on `rows` slots stops once the live rows fit the next smaller bucket."""
  smaller = [b for b in buckets if b < rows]
  return max(smaller, default=0)


def stop_table(stop_ids: tuple[tuple[int, ...], ...]) -> np.ndarray:
  """(stop sequences, longest stop) int32, each right-aligned, -2 = any token before it."""
  seqs = stop_ids or ((-1,),)  # -1 never matches: no stops
  table = np.full((len(seqs), max(map(len, seqs))), ANY_TOKEN, np.int32)
  for i, q in enumerate(seqs):
    table[i, table.shape[1] - len(q):] = q
  return table
