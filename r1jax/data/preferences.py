"""Preference pairs for reward models: {prompt, chosen, rejected} rows, read and encoded.

A Bradley–Terry reward model (rewards/reward_model.py, trained by stages/reward_model.py)
learns r(prompt + chosen) > r(prompt + rejected). Rows are jsonl; malformed ones are logged
with their line and skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from r1jax.core.tokenizer import render_prompt

log = logging.getLogger(__name__)


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
