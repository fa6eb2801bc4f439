"""Preference pairs for reward models: {prompt, chosen, rejected} rows, read and encoded.

A Bradley–Terry reward model (rewards/reward_model.py, trained by stages/reward_model.py)
learns r(prompt + chosen) > r(prompt + rejected). Rows come through the one loader
(data/rows.py: jsonl, a JSON array, CSV, parquet); malformed ones are logged and skipped.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from r1jax.core.errors import DataError
from r1jax.core.storage import Path
from r1jax.core.tokenizer import render_prompt
from r1jax.data.rows import BadRow, RowError, check_bad_share, log_bad_row, read_records


def adapt_pair(record: Any) -> dict[str, str]:
  """A {prompt, chosen, rejected} row (all strings), or a RowError saying what is wrong."""
  if isinstance(record, RowError):
    raise record
  missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record.get(k), str)]
  if missing:
    raise RowError("missing_field", f"missing or non-string {missing}")
  return {k: record[k] for k in ("prompt", "chosen", "rejected")}


def load_pairs(path: str | Path, max_bad_share: float = 1.0) -> list[dict[str, str]]:
  """Preference rows from any data file `read_records` reads; bad rows are logged and skipped,
  and more than `max_bad_share` of them stops (DataError)."""
  rows, bad = [], []
  for line, record in read_records(path):
    try:
      rows.append(adapt_pair(record))
    except RowError as e:
      bad.append(BadRow(line, e.reason, e.detail))
      log_bad_row(path, bad[-1])
  check_bad_share(path, len(rows), bad, max_bad_share)
  if not rows:
    raise DataError(f"{path} holds no usable preference rows ({len(bad)} malformed)")
  return rows


def encode_pairs(tokenizer, rows: Sequence[dict], template: str, max_len: int):
  """Right-padded (tokens, mask) for chosen and rejected: each (B, max_len).

  The prompt is rendered with the chat template and the response appended;
  an over-long sequence keeps its end (the response), where the score is read.
  """
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
