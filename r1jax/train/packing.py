"""The rows the GRPO update trains on: prompt + completion sequences packed into rows.

The update has one input layout, PackedRollout (train/batches.py): rows of tokens with
per-sequence positions and segment ids (attention never crosses a sequence), and everything
the loss needs per token, aligned with the token it scores: the sampler's logp, the reference
logp, the sample's advantage, the loss mask and the token's weight in Σ w·ℓ. The weights are
where `loss_mode` is read (`_weights`, float64, over each whole mini-batch), so micro-batches
sum to their mini-batch's loss and every layout gives the same loss and gradient.

Two layouts:
- `one_per_row` (`grpo.pack=False`): row i is sample i's padded row of S + T columns.
- `pack_rollout` (the default): with R1's heavy-tailed lengths most of those columns are
  padding, so each sample's real prompt and completion tokens go one after another into rows
  of `row_len` tokens. With `grpo.share_prompts`, short samples of one group follow one copy
  of their prompt, and sample ids keep them apart (`_first_fit`, `_place`).

Mini-batches hold the same samples in both (sample i in mini-batch (i // A) mod M, as
`batches.split_rows` deals rows). Packed, within one, sequences are placed first-fit by decreasing
length; the rows are dealt to the A micro-batches in turn, and every micro-batch gets the
same row count: `rows_multiple` (the devices rows spread over) times a number of at most 3
significant bits, so rows divide over the mesh and few shapes ever compile (`_bucket`).
Row r of the result belongs to mini-batch (r // A) mod M, micro-batch r mod A, as
`split_rows` expects; within a micro-batch, rows of similar length share a lane step
(`_lane_slot`).

With several processes each packs its own samples (its block of the global batch): the
weights' denominators are summed over processes, and all agree on the rows per micro-batch,
so the global batch is every process's rows in process order, with the same loss.
"""

from __future__ import annotations

import jax
import numpy as np

from r1jax.core import multihost
from r1jax.core.config import GRPOConfig
from r1jax.train.batches import PackedRollout, RolloutBatch, check_batch


def _weights(lengths: np.ndarray, mode: str, width: int,
             totals: tuple[int, int, int]) -> np.ndarray:
  """Per-sample token weight of one mini-batch (float64): the loss-mode switch, the only one.
  `totals`: the whole mini-batch's (samples with tokens, tokens, samples), over processes."""
  has_count, tokens, samples = totals
  if mode == "grpo":
    return np.where(lengths > 0, 1.0 / np.maximum(lengths, 1) / max(has_count, 1), 0.0)
  if mode == "bnpo":
    return np.full(lengths.shape, 1.0 / max(tokens, 1))
  if mode == "dr_grpo":
    return np.full(lengths.shape, 1.0 / (samples * width))
  raise ValueError(f"unknown loss mode {mode!r}")


def _totals(lengths: np.ndarray, groups: list[np.ndarray]) -> list[tuple[int, int, int]]:
  """Each mini-batch's (samples with tokens, tokens, samples), summed over processes."""
  local = [[int((lengths[g] > 0).sum()), int(lengths[g].sum()), int(g.sum())] for g in groups]
  if jax.process_count() == 1:
    return [tuple(x) for x in local]
  every = multihost.gather_json(local)
  return [tuple(sum(part[j][f] for part in every) for f in range(3))
          for j in range(len(groups))]


def _bucket(rows: int, multiple: int) -> int:
  """Rows per micro-batch: `multiple` × a number with at most 3 significant bits (1–8, 10,
  12, 14, 16, 20, …), so at most 4 shapes per doubling ever compile and at most 25% of the
  rows are padding ones."""
  units = -(-rows // multiple)
  quantum = 1 << max(units.bit_length() - 3, 0)
  return multiple * -(-units // quantum) * quantum


def _first_fit(prompt_len: list[int], comp_len: list[int], key: list, row_len: int,
               share: bool) -> list[list[list[int]]]:
  """Rows of runs of sample indices, first fit by decreasing length (ties by index).

  A run is one segment: a prompt, then its samples. A sample joins a run of its prompt
  (`key`) in the row only while the run's samples so far hold at most P − 1 tokens (P the
  prompt's length): each query then sees at most P − 1 more (masked) keys than it would
  alone, and the P − 1 prompt tokens are not computed again.
  """
  rows: list[list[list[int]]] = []
  free: list[int] = []
  own = lambda i: 1 + comp_len[i]  # the copied last prompt token, then the completion
  for i in sorted(range(len(comp_len)), key=lambda k: (-(prompt_len[k] + comp_len[k]), k)):
    for r, runs in enumerate(rows):
      run = next((u for u in runs if share and key[u[0]] == key[i]
                  and sum(map(own, u)) <= prompt_len[i] - 1), None)
      if run is not None and free[r] >= own(i):
        run.append(i)
        free[r] -= own(i)
        break
      if free[r] >= prompt_len[i] + comp_len[i]:
        runs.append([i])
        free[r] -= prompt_len[i] + comp_len[i]
        break
    else:
      rows.append([[i]])
      free.append(row_len - prompt_len[i] - comp_len[i])
  return rows


def _lane_slot(rank: int, rows: int, lanes: int) -> int:
  """Where the micro-batch's rank-th row (longest sequence first) goes. Its rows spread over
  `lanes` devices in contiguous blocks and attend one row per device at a time
  (`attention.windowed_attention`), so rows of similar length sit at the same offset of each
  block: ranks 0, 1, … go to offsets 0 of blocks 0, 1, …, then offsets 1, …"""
  if rows % lanes:
    return rank
  return (rank % lanes) * (rows // lanes) + rank // lanes


def _loss_mask(batch: RolloutBatch, cfg: GRPOConfig) -> np.ndarray:
  """(N, T) the completion tokens the loss counts: minus truncated ones if configured."""
  check_batch(batch, 1)  # consistent shapes, with a clear error
  loss_mask = np.asarray(batch.completion_mask, bool).copy()
  if cfg.mask_truncated and batch.truncated is not None:
    loss_mask &= ~np.asarray(batch.truncated, bool)[:, None]
  return loss_mask


def _sample_weights(loss_mask: np.ndarray, cfg: GRPOConfig) -> np.ndarray:
  """(N,) each sample's token weight: `_weights` over the samples of its mini-batch (sample
  i is in mini-batch (i // A) mod M, as batches.split_rows deals rows)."""
  n, t = loss_mask.shape
  m_, a_ = cfg.minibatches, cfg.microbatches
  if n % (m_ * a_):
    raise ValueError(f"{n} samples do not split into {m_} mini-batches × {a_} micro-batches")
  weight_i, lengths = np.zeros(n), loss_mask.sum(1)
  groups = [(np.arange(n) // a_) % m_ == j for j in range(m_)]
  for members, totals in zip(groups, _totals(lengths, groups)):
    weight_i[members] = _weights(lengths[members], cfg.loss_mode, t, totals)
  return weight_i


def token_weights(loss_mask_NxT: np.ndarray, cfg: GRPOConfig) -> np.ndarray:
  """(N, T) float64 weight of each loss token in its mini-batch's Σ w·ℓ (0 off the mask)."""
  loss_mask_NxT = np.asarray(loss_mask_NxT, bool)
  return np.where(loss_mask_NxT, _sample_weights(loss_mask_NxT, cfg)[:, None], 0.0)


def one_per_row(batch: RolloutBatch, cfg: GRPOConfig) -> PackedRollout:
  """The padded batch as packed rows of one sequence each (`grpo.pack=False`): row i is
  sample i's padded row, so column S + t holds completion token t, and the rows split into
  mini- and micro-batches as the samples do. The loss is the tightly packed one's."""
  tokens, mask = np.asarray(batch.tokens, np.int32), np.asarray(batch.mask, bool)
  loss_mask = _loss_mask(batch, cfg)
  n, t = loss_mask.shape
  s = tokens.shape[1] - t
  wide = lambda x_NxT, dtype: np.concatenate(
      [np.zeros((n, s), dtype), np.broadcast_to(np.asarray(x_NxT, dtype), (n, t))], axis=1)
  return PackedRollout(
      tokens=tokens, positions=np.maximum(np.cumsum(mask, 1, dtype=np.int32) - 1, 0),
      segment_ids=mask.astype(np.int32), loss_mask=wide(loss_mask, bool),
      weights=wide(token_weights(loss_mask, cfg), np.float32),
      old_logp=wide(batch.old_logp, np.float32),
      advantages=wide(np.asarray(batch.advantages, np.float32)[:, None], np.float32),
      ref_logp=None if batch.ref_logp is None else wide(batch.ref_logp, np.float32))


def pack_rollout(batch: RolloutBatch, cfg: GRPOConfig, row_len: int = 0,
                 rows_multiple: int = 1, index: list | None = None
                 ) -> tuple[PackedRollout, dict[str, float]]:
  """A host RolloutBatch packed for `cfg`'s mini/micro-batches; also packing stats.

  row_len: tokens per packed row (0: the padded row width S + T, so any sample fits).
  index: a list to receive the (rows, row_len) int64 map from each packed column to the
  completion token it holds, as i·T + j for sample i's token j (-1 elsewhere): per-token
  values computed on the packed rows go back to (N, T) by it (`unpack_completions`).
  """
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.mask, bool)
  comp = np.asarray(batch.completion_mask, bool)
  n, t = comp.shape
  s = tokens.shape[1] - t
  m_, a_ = cfg.minibatches, cfg.microbatches
  loss_mask = _loss_mask(batch, cfg)
  weight_i = _sample_weights(loss_mask, cfg)
  row_len = row_len or s + t
  if not mask[:, :s].any(axis=1).all():
    raise ValueError("every sample needs a prompt token: a packed completion's first token "
                     "is scored from the token before it in its own sequence")
  prompt = [tokens[i, :s][mask[i, :s]] for i in range(n)]
  completion = [tokens[i, s:][comp[i]] for i in range(n)]
  seq_len = [len(prompt[i]) + len(completion[i]) for i in range(n)]
  too_long = [i for i in range(n) if seq_len[i] > row_len]
  if too_long:
    raise ValueError(f"samples {too_long[:5]} have {seq_len[too_long[0]]} tokens, more "
                     f"than the packed row length {row_len}")
  key = [p.tobytes() for p in prompt]  # samples share a prompt copy only if it is the same
  layout: list[list[list]] = [[[] for _ in range(a_)] for _ in range(m_)]
  for j in range(m_):
    members = [i for i in range(n) if (i // a_) % m_ == j]
    rows = _first_fit([len(prompt[i]) for i in members], [len(completion[i]) for i in members],
                      [key[i] for i in members], row_len, cfg.share_prompts)
    for k, row in enumerate(rows):
      layout[j][k % a_].append([[members[i] for i in run] for run in row])
  # Several processes: the rows of a micro-batch spread over every process's devices, each
  # process's over its own (`rows_multiple` / processes), the same count on each.
  count = jax.process_count()
  lanes = rows_multiple // count if rows_multiple % count == 0 else rows_multiple
  per_micro = multihost.max_over_processes(
      _bucket(max(len(rows) for mini in layout for rows in mini), lanes))
  r_total = per_micro * m_ * a_
  out = {name: np.zeros((r_total, row_len), dtype) for name, dtype in (
      ("tokens", np.int32), ("positions", np.int32), ("segment_ids", np.int32),
      ("sample_ids", np.int32),
      ("loss_mask", bool), ("weights", np.float32), ("old_logp", np.float32),
      ("advantages", np.float32), ("ref_logp", np.float32))}
  if index is not None:
    out["index"] = np.full((r_total, row_len), -1, np.int64)
  for j in range(m_):
    for l in range(a_):
      for rank, runs in enumerate(layout[j][l]):
        k = _lane_slot(rank, per_micro, lanes)
        r = k * m_ * a_ + j * a_ + l  # split_rows: row r -> mini-batch j, micro-batch l
        _place(out, r, runs, prompt, completion, comp, loss_mask, weight_i, batch)
  if index is not None:
    index.append(out.pop("index"))
  if batch.ref_logp is None:
    del out["ref_logp"]
  if not cfg.share_prompts:  # one sample per segment: the sample rule adds nothing to mask
    del out["sample_ids"]
  useful = sum(seq_len)
  placed = int((out["segment_ids"] > 0).sum())
  stats = {"pack/rows": float(r_total), "pack/fill": placed / (r_total * row_len),
           "pack/padded_fill": useful / (n * (s + t)),
           "pack/shared_prompt_tokens": float(useful - placed)}
  return PackedRollout(**out), stats


def _place(out: dict, r: int, runs: list[list[int]], prompt: list, completion: list,
           comp: np.ndarray, loss_mask: np.ndarray, weight_i: np.ndarray,
           batch: RolloutBatch) -> None:
  """Writes runs one after another into packed row r: each run is segment 1, 2, …, its
  prompt minus the last token (sample id 0, seen by all of the run), then for its k-th
  sample the last prompt token again and the completion (sample id k), at the positions
  the sample has alone. Each completion token is thus scored from the column before it."""
  at = 0
  for seg, run in enumerate(runs, 1):
    p = prompt[run[0]]
    span = slice(at, at + len(p) - 1)
    out["tokens"][r, span], out["positions"][r, span] = p[:-1], np.arange(len(p) - 1)
    out["segment_ids"][r, span] = seg
    at += len(p) - 1
    for k, i in enumerate(run, 1):
      n_comp = len(completion[i])
      span = slice(at, at + 1 + n_comp)
      out["tokens"][r, span] = np.concatenate([p[-1:], completion[i]])
      out["positions"][r, span] = np.arange(len(p) - 1, len(p) + n_comp)
      out["segment_ids"][r, span] = seg
      out["sample_ids"][r, span] = k
      c = slice(at + 1, at + 1 + n_comp)  # the completion's columns
      real = comp[i]
      out["loss_mask"][r, c] = loss_mask[i][real]
      out["weights"][r, c] = np.where(loss_mask[i][real], weight_i[i], 0.0)
      out["old_logp"][r, c] = np.asarray(batch.old_logp)[i][real]
      out["advantages"][r, c] = np.asarray(batch.advantages)[i]
      if batch.ref_logp is not None:
        out["ref_logp"][r, c] = np.asarray(batch.ref_logp)[i][real]
      if "index" in out:
        out["index"][r, c] = i * comp.shape[1] + np.flatnonzero(real)
      at += 1 + n_comp


def unpack_completions(values_RxQ: np.ndarray, index_RxQ: np.ndarray, n: int,
                       t: int) -> np.ndarray:
  """(N, T) f32 per-completion-token values from packed columns (`pack_rollout`'s index);
  0 where a sample has no token."""
  out = np.zeros(n * t, np.float32)
  at = index_RxQ >= 0
  out[index_RxQ[at]] = np.asarray(values_RxQ)[at]
  return out.reshape(n, t)
