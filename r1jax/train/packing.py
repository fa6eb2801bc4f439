"""Padding-free GRPO batches: prompt + completion sequences packed back to back into rows.

A padded RolloutBatch spends a row of S + T columns on every sample, however short its
completion; with R1's heavy-tailed lengths most of those columns are padding. Packing puts
each sample's real prompt and completion tokens one after another into rows of `row_len`
tokens, with per-sequence positions and segment ids (attention never crosses a sequence),
and carries everything the loss needs per token, aligned with the token it scores:
the sampler's logp, the reference logp, the sample's advantage, the loss mask and the
token's weight in Σ w·ℓ. The weights are the padded path's (`losses.token_weights` over each
mini-batch's `loss_denominator`), computed here in float64, so every loss mode gives the
same loss and gradient as the padded update.

Mini-batches hold the same samples as `batches.split_rows` gives the padded path (sample i
in mini-batch (i // A) mod M). Within one, sequences are placed first-fit by decreasing
length; the rows are dealt to the A micro-batches in turn, and every micro-batch gets the
same row count: `rows_multiple` (the devices rows spread over) times a number of at most 3
significant bits, so rows divide over the mesh and few shapes ever compile (`_bucket`).
Row r of the result belongs to mini-batch (r // A) mod M, micro-batch r mod A, as
`split_rows` expects.
"""

from __future__ import annotations

import numpy as np

from r1jax.core.config import GRPOConfig
from r1jax.train.batches import PackedRollout, RolloutBatch


def _weights(lengths: np.ndarray, mode: str, width: int) -> np.ndarray:
  """Per-sample token weight of one mini-batch (float64): `token_weights / denominator`."""
  has = lengths > 0
  if mode == "grpo":
    return np.where(has, 1.0 / np.maximum(lengths, 1) / max(int(has.sum()), 1), 0.0)
  if mode == "bnpo":
    return np.full(lengths.shape, 1.0 / max(int(lengths.sum()), 1))
  if mode == "dr_grpo":
    return np.full(lengths.shape, 1.0 / (lengths.size * width))
  raise ValueError(f"unknown loss mode {mode!r}")


def _bucket(rows: int, multiple: int) -> int:
  """Rows per micro-batch: `multiple` × a number with at most 3 significant bits (1–8, 10,
  12, 14, 16, 20, …), so at most 4 shapes per doubling ever compile and at most 25% of the
  rows are padding ones."""
  units = -(-rows // multiple)
  quantum = 1 << max(units.bit_length() - 3, 0)
  return multiple * -(-units // quantum) * quantum


def _first_fit(lengths: list[int], row_len: int) -> list[list[int]]:
  """Sequence indices per row, first fit by decreasing length (ties by index)."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
    at = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
    if at is None:
      rows.append([])
      free.append(row_len)
      at = len(rows) - 1
    rows[at].append(i)
    free[at] -= lengths[i]
  return rows


def pack_rollout(batch: RolloutBatch, cfg: GRPOConfig, row_len: int = 0,
                 rows_multiple: int = 1) -> tuple[PackedRollout, dict[str, float]]:
  """A host RolloutBatch packed for `cfg`'s mini/micro-batches; also packing stats.

  row_len: tokens per packed row (0: the padded row width S + T, so any sample fits).
  """
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.mask, bool)
  comp = np.asarray(batch.completion_mask, bool)
  n, t = comp.shape
  s = tokens.shape[1] - t
  m_, a_ = cfg.minibatches, cfg.microbatches
  if n % (m_ * a_):
    raise ValueError(f"{n} samples do not split into {m_} mini-batches × {a_} micro-batches")
  row_len = row_len or s + t
  loss_mask = comp.copy()
  if cfg.mask_truncated and batch.truncated is not None:
    loss_mask &= ~np.asarray(batch.truncated, bool)[:, None]
  if not mask[:, :s].any(axis=1).all():
    raise ValueError("every sample needs a prompt token: a packed completion's first token "
                     "is scored from the token before it in its own sequence")
  seq = [np.concatenate([tokens[i, :s][mask[i, :s]], tokens[i, s:][comp[i]]]) for i in range(n)]
  too_long = [i for i in range(n) if len(seq[i]) > row_len]
  if too_long:
    raise ValueError(f"samples {too_long[:5]} have {len(seq[too_long[0]])} tokens, more "
                     f"than the packed row length {row_len}")
  weight_i = np.zeros(n)
  layout: list[list[list[int]]] = [[[] for _ in range(a_)] for _ in range(m_)]
  for j in range(m_):
    members = [i for i in range(n) if (i // a_) % m_ == j]
    weight_i[members] = _weights(loss_mask[members].sum(1), cfg.loss_mode, t)
    for k, row in enumerate(_first_fit([len(seq[i]) for i in members], row_len)):
      layout[j][k % a_].append([members[i] for i in row])
  per_micro = _bucket(max(len(rows) for mini in layout for rows in mini), rows_multiple)
  r_total = per_micro * m_ * a_
  out = {name: np.zeros((r_total, row_len), dtype) for name, dtype in (
      ("tokens", np.int32), ("positions", np.int32), ("segment_ids", np.int32),
      ("loss_mask", bool), ("weights", np.float32), ("old_logp", np.float32),
      ("advantages", np.float32), ("ref_logp", np.float32))}
  for j in range(m_):
    for l in range(a_):
      for k, members in enumerate(layout[j][l]):
        r = k * m_ * a_ + j * a_ + l  # split_rows: row r -> mini-batch j, micro-batch l
        _place(out, r, members, seq, s, comp, loss_mask, weight_i, batch)
  if batch.ref_logp is None:
    del out["ref_logp"]
  useful = sum(len(x) for x in seq)
  stats = {"pack/rows": float(r_total), "pack/fill": useful / (r_total * row_len),
           "pack/padded_fill": useful / (n * (s + t))}
  return PackedRollout(**out), stats


def _place(out: dict, r: int, members: list[int], seq: list, s: int, comp: np.ndarray,
           loss_mask: np.ndarray, weight_i: np.ndarray, batch: RolloutBatch) -> None:
  """Writes sequences `members` one after another into packed row r."""
  at = 0
  for seg, i in enumerate(members, 1):
    n_tok, n_comp = len(seq[i]), int(comp[i].sum())
    span = slice(at, at + n_tok)
    out["tokens"][r, span] = seq[i]
    out["positions"][r, span] = np.arange(n_tok)
    out["segment_ids"][r, span] = seg
    c = slice(at + n_tok - n_comp, at + n_tok)  # the completion's columns
    real = comp[i]
    out["loss_mask"][r, c] = loss_mask[i][real]
    out["weights"][r, c] = np.where(loss_mask[i][real], weight_i[i], 0.0)
    out["old_logp"][r, c] = np.asarray(batch.old_logp)[i][real]
    out["advantages"][r, c] = np.asarray(batch.advantages)[i]
    if batch.ref_logp is not None:
      out["ref_logp"][r, c] = np.asarray(batch.ref_logp)[i][real]
    at += n_tok
