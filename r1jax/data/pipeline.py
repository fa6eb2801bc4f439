"""grain input pipelines: RL prompt batches and packed SFT batches, sharded and checkpointable.

RL prompts (`PromptPipeline`): rows are rendered with a template and tokenized once, up front.
Prompt sets are small (≤ ~1e5 rows), and doing it eagerly means bad rows are counted exactly
once and every host sees the same clean row count, so all hosts yield the same number of
batches and stay in lockstep (a host running out first would hang the others' collectives).
grain then shuffles (reshuffled each epoch), repeats, and deals the global stream round-robin
to hosts: global batch k is items [k·B·H, (k+1)·B·H) of the shuffled stream, host h takes every
H-th of them. The iterator state is that global position, the same on every host.

SFT (`SFTPipeline`): rows are tokenized lazily in grain's reader threads (SFT sets are large)
and packed first-fit into the B rows of a batch from a read-ahead window of documents; one that
fits nowhere waits in the window for the next batch (the oldest is always placed first, so none
waits forever). The state is grain's position before the oldest waiting document plus which of
the records read since then still wait, so a resumed iterator rebuilds the window exactly.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from r1jax.core import storage
from r1jax.core import tokenizer as tok_lib
from r1jax.core.errors import DataError
from r1jax.core.storage import Path
from r1jax.data import sft_rows
from r1jax.data.rows import (BadRow, RowError, check_bad_share, load_rows,  # noqa: F401
                            data_paths, log_bad_row, parse_json_line, record_source)

log = logging.getLogger(__name__)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count) of this host; defaults to the JAX process."""
  if shard_index is None or shard_count is None:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return shard_index, shard_count


def _stream(source: Any, seed: int, shuffle: bool, num_epochs: int | None) -> grain.MapDataset:
  """Source -> shuffled (a new order per epoch) and repeated MapDataset."""
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs)  # None: forever.


# ------------------------------------------------------------------------------ RL prompts


def prepare_prompts(rows: Sequence[dict], tokenizer: tok_lib.Tokenizer, template: str = "r1_zero",
                    max_prompt_tokens: int | None = None, system: str | None = None,
                    add_bos: bool = True, source: str = "rows",
                    ) -> tuple[list[dict], list[BadRow]]:
  """Adds `prompt` (str) and `prompt_ids` (list[int]) to rows; too-long prompts become BadRows."""
  items, bad = [], []
  for i, row in enumerate(rows, start=1):
    prompt = tok_lib.render_prompt(template, row["question"], system)
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
      bad.append(BadRow(row.get("meta", {}).get("line", i), "prompt_too_long",
                        f"{len(ids)} > {max_prompt_tokens} tokens"))
      log_bad_row(source, bad[-1])
      continue
    items.append({**row, "prompt": prompt, "prompt_ids": ids})
  return items, bad


class PromptPipeline:
  """Batches of B prompt items per host (lists of dicts), deterministic and resumable.

  Item: {"id", "question", "gold", "task", "meta", "prompt", "prompt_ids"}. `skipped` counts the
  bad rows by reason (file rows and too-long prompts), for metrics.
  """

  def __init__(self, rows: str | Path | Sequence[dict], tokenizer: tok_lib.Tokenizer,
               batch_size: int, *, template: str = "r1_zero", system: str | None = None,
               max_prompt_tokens: int | None = None, add_bos: bool = True, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               adapter: str = "auto", bad_rows: Sequence[BadRow] = (),
               max_bad_share: float = 1.0):
    if batch_size < 1:
      raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    source = "rows"
    self.bad_rows = list(bad_rows)
    if isinstance(rows, (str, os.PathLike)):
      source = str(rows)
      rows, file_bad = load_rows(rows, adapter)
      self.bad_rows += file_bad
    self.items, prompt_bad = prepare_prompts(rows, tokenizer, template, max_prompt_tokens,
                                             system, add_bos, source)
    self.bad_rows += prompt_bad
    self.skipped = collections.Counter(b.reason for b in self.bad_rows)
    check_bad_share(source, len(self.items), self.bad_rows, max_bad_share)
    if not self.items:
      raise DataError(f"no usable prompt rows in {source} (skipped: {dict(self.skipped)})")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.num_epochs = num_epochs
    self.shard_index, self.shard_count = _shard(shard_index, shard_count)
    # Identifies the data and order a state belongs to; the shard count is left out on purpose
    # (the state is a global position), so a run may resume on a different number of hosts.
    digest = hashlib.sha1("\n".join(r["id"] for r in self.items).encode()).hexdigest()[:16]
    self.fingerprint = {"rows": len(self.items), "ids_sha1": digest, "seed": seed,
                        "shuffle": shuffle, "num_epochs": num_epochs}
    self.global_batch = batch_size * self.shard_count
    ds = _stream(self.items, seed, shuffle, num_epochs)
    if num_epochs is not None:  # Every host must get the same number of full batches.
      usable = len(ds) - len(ds) % self.global_batch
      if usable == 0:
        raise ValueError(f"{len(ds)} prompts over {num_epochs} epochs is less than one global "
                         f"batch of {self.global_batch}")
      ds = ds.slice(slice(0, usable))
    # Host h takes the h-th block of each global batch: the hosts' batches, in host order,
    # are the global batch one host would read (rows in the same order, so the same samples).
    lo = self.shard_index * batch_size
    ds = ds.batch(self.global_batch, drop_remainder=True, batch_fn=list)
    self._ds = ds.map(lambda batch: [_copy_item(x) for x in batch[lo:lo + batch_size]])

  def __len__(self) -> int:
    """Batches per host (huge when repeating forever)."""
    return len(self._ds)

  def __iter__(self) -> PromptIterator:
    return PromptIterator(self)


def _copy_item(item: dict) -> dict:
  """A fresh item per yield, so a consumer's edits never leak into later epochs."""
  return {**item, "meta": dict(item["meta"]), "prompt_ids": list(item["prompt_ids"])}


class PromptIterator:
  """Yields lists of B items; get_state() / set_state() are JSON-able and host-independent."""

  def __init__(self, pipeline: PromptPipeline):
    self.pipeline = pipeline
    # In-memory rows: reader threads would only contend for the GIL.
    self._it = pipeline._ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

  def __iter__(self) -> PromptIterator:
    return self

  def __next__(self) -> list[dict]:
    return next(self._it)

  def get_state(self) -> dict:
    """{'consumed': global items consumed, …fingerprint}: equal on every host."""
    batches = self._it.get_state()["next_index"]
    return {"consumed": batches * self.pipeline.global_batch, **self.pipeline.fingerprint}

  def set_state(self, state: dict) -> None:
    """Resumes at a state from get_state (possibly saved with a different host count)."""
    p = self.pipeline
    diff = {k: (state.get(k), v) for k, v in p.fingerprint.items() if state.get(k) != v}
    if diff:
      raise ValueError(f"iterator state is for other data or order: {diff} (saved, current)")
    if state["consumed"] % p.global_batch:
      raise ValueError(f"{state['consumed']} consumed prompts is not a whole number of global "
                       f"batches of {p.global_batch}")
    self._it.set_state({"next_index": state["consumed"] // p.global_batch})


# ---------------------------------------------------------------------------------- SFT


class SFTPipeline:
  """Packed next-token batches from jsonl/parquet rows (formats: data/sft_rows.py).

  Each batch is a dict of numpy arrays, all (B, T):
    tokens int32 (pad_id on padding), mask bool (real token), loss_mask bool (token j is a
    target: completion tokens + EOS for prompt/completion rows, every token but the first for
    text rows; never the first token of a document), positions int32 (0, 1, … restarting per
    document; 0 on padding), segment_ids int32 (1, 2, … per document in its row; 0 = padding).
  Without segment masking in the model, packed documents attend to earlier ones in their row
  (no target ever crosses a boundary, but context leaks); with it, packing is exact.
  Packing is first-fit over a window of `window` documents (default 4·B): larger packs denser
  but moves documents further from their shuffled order.
  A document longer than P is truncated to its first P tokens (counted as "truncated"): a
  split-off tail would be a completion without its prompt. With `template`, the prompt is
  rendered as a single user turn and the completion as the assistant's reply.
  """

  def __init__(self, path: str | Path, tokenizer: tok_lib.Tokenizer, batch_size: int,
               seq_len: int, *, template: str | None = None, system: str | None = None,
               add_bos: bool = True, add_eos: bool = True, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, shard_index: int | None = None,
               shard_count: int | None = None, window: int | None = None,
               read_threads: int = 4, distill_top_k: int = 0, max_bad_share: float = 1.0):
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"need batch_size ≥ 1 and seq_len ≥ 2, got {batch_size}, {seq_len}")
    self.path = str(path)  # one file, or several joined by commas (read as one, in order)
    source = record_source(self.path)
    if len(source) == 0:
      raise DataError(f"no rows in {self.path}")
    self.tokenizer, self.template, self.system = tokenizer, template, system
    self.add_bos, self.add_eos = add_bos, add_eos
    self.batch_size, self.seq_len = batch_size, seq_len
    self.distill_top_k = int(distill_top_k)
    self.max_bad_share = max_bad_share
    self.window = window or 4 * batch_size
    self.shard_index, self.shard_count = _shard(shard_index, shard_count)
    size = sum(storage.size(p) for p in data_paths(path))
    self.fingerprint = {"rows": len(source), "bytes": size, "seed": seed,
                        "shuffle": shuffle, "num_epochs": num_epochs,
                        "shard": [self.shard_index, self.shard_count],
                        "batch_size": batch_size, "seq_len": seq_len, "window": self.window,
                        "distill_top_k": self.distill_top_k}
    # Records in one pass over this host's shard: that many bad ones in a row means none is
    # usable, which must fail loudly rather than spin (repeating epochs) or end silently.
    self.pass_records = len(range(self.shard_index, len(source), self.shard_count))
    ds = _stream(source, seed, shuffle, num_epochs)
    ds = ds.slice(slice(self.shard_index, None, self.shard_count))
    self._ds = ds.map(self.encode)
    self._read_options = grain.ReadOptions(num_threads=read_threads,
                                   prefetch_buffer_size=max(16, 4 * read_threads))

  def encode(self, record: tuple[int, Any]) -> dict:
    """(line, raw line or dict) -> {line, ids, targets} or {line, bad, detail}; never raises."""
    line, raw = record
    row = parse_json_line(raw) if isinstance(raw, (bytes, str)) else raw
    try:
      if isinstance(row, RowError):
        raise row
      doc = (sft_rows.teacher_doc(row, self.tokenizer, self.distill_top_k, self.add_eos)
             if self.distill_top_k else sft_rows.text_doc(
                 row, self.tokenizer, self.template, self.system, self.add_bos, self.add_eos))
      truncated = len(doc["ids"]) > self.seq_len
      doc = {k: v[:self.seq_len] for k, v in doc.items()}
      if not doc["targets"].any():
        raise RowError("no_target", f"prompt fills all {self.seq_len} tokens")
    except RowError as e:
      return {"line": line, "bad": e.reason, "detail": e.detail}
    return {"line": line, **doc, "truncated": truncated}

  def __iter__(self) -> SFTIterator:
    return SFTIterator(self)


_LOGGED_PER_REASON = 20


class DataInterrupted(Exception):
  """Reading was stopped by `SFTIterator.should_stop` (a preemption), not by the data."""


_PACKING_COUNTS = ("documents", "truncated", "tokens", "target_tokens", "padding", "rows_read")


class SFTIterator:
  """Yields packed batch dicts (see SFTPipeline); get_state() / set_state() are JSON-able.

  The state is per host (each host packs its own shard), so save one per process.
  """

  def __init__(self, pipeline: SFTPipeline):
    self.p = pipeline
    self._it = pipeline._ds.to_iter_dataset(pipeline._read_options).__iter__()
    # Read-ahead documents not yet placed, oldest first: (record number, grain state just
    # before it was read, document). Records are numbered in read order, bad ones included.
    self._window: list[tuple[int, dict, dict]] = []
    self._next_record = 0
    self._exhausted = False
    self._bad_run = 0  # bad records read since the last good one
    # Polled while reading (e.g. the SIGTERM flag): a long run of bad rows must not make the
    # process deaf to preemption. When it returns True, reading raises DataInterrupted.
    self.should_stop: Callable[[], bool] | None = None
    self._logged: set[tuple[int, str]] = set()
    self._logged_per_reason: collections.Counter = collections.Counter()
    self.counts: collections.Counter = collections.Counter()  # Reasons, truncated, documents, …
    self._first_bad: BadRow | None = None

  def __iter__(self) -> SFTIterator:
    return self

  def _read(self) -> tuple[int, dict, dict] | None:
    """The next record as (number, state before it, document), or None at the end."""
    state = dict(self._it.get_state())
    try:
      doc = next(self._it)
    except StopIteration:
      self._exhausted = True
      return None
    self._next_record += 1
    return self._next_record - 1, state, doc

  def _refill(self) -> None:
    """Reads until the window holds `window` good documents; bad ones are counted and logged.

    Raises ValueError when a whole pass over the shard (or the whole data) held no usable row.
    """
    while len(self._window) < self.p.window and not self._exhausted:
      record = self._read()
      if record is None:
        break
      doc = record[2]
      self.counts["rows_read"] += 1
      if "bad" not in doc:
        self._window.append(record)
        self._bad_run = 0
        continue
      self._bad_run += 1
      if self.should_stop is not None and self._bad_run % 256 == 0 and self.should_stop():
        raise DataInterrupted(f"stopped while skipping bad rows of {self.p.path}")
      self.counts[doc["bad"]] += 1
      self._log_bad(doc)
      if self._bad_run >= self.p.pass_records:
        self._no_usable_rows()
      self._check_bad_share(doc)
    if self._exhausted and not self._window and not self.counts["documents"]:
      self._no_usable_rows()

  def _log_bad(self, doc: dict) -> None:
    """Logs a bad row once per process (not per epoch), the first _LOGGED_PER_REASON of each
    reason only: a file of a million bad rows must not flood the log (all are counted)."""
    key, n = (doc["line"], doc["bad"]), self._logged_per_reason[doc["bad"]]
    if key in self._logged or n > _LOGGED_PER_REASON:
      return
    self._logged_per_reason[doc["bad"]] += 1
    if n < _LOGGED_PER_REASON:
      self._logged.add(key)
      log_bad_row(self.p.path, BadRow(doc["line"], doc["bad"], doc["detail"]))
    else:
      log.warning("%s: further %r rows are counted, not logged", self.p.path, doc["bad"])

  def _check_bad_share(self, doc: dict) -> None:
    """DataError once the bad rows exceed max_bad_share of a pass: against the whole pass
    while the first is read (no early alarm from a bad first row), then of all rows read."""
    if self._first_bad is None:
      self._first_bad = BadRow(doc["line"], doc["bad"], doc["detail"])
    skipped = {k: v for k, v in self.counts.items() if k not in _PACKING_COUNTS}
    bad = sum(skipped.values())
    if bad > self.p.max_bad_share * max(self.counts["rows_read"], self.p.pass_records):
      f = self._first_bad
      raise DataError(
          f"{self.p.path}: {bad} of {self.counts['rows_read']} rows read are unusable, over "
          f"max_bad_share {self.p.max_bad_share:.1%} of its {self.p.pass_records} rows: "
          f"{skipped}; the first is row {f.index}: {f.reason}"
          f"{f' ({f.detail})' if f.detail else ''}. Fix the file, or raise max_bad_share.")

  def _no_usable_rows(self) -> None:
    skipped = {k: v for k, v in self.counts.items() if k not in _PACKING_COUNTS}
    raise DataError(f"no usable rows in {self.p.path}: a whole pass over its "
                     f"{self.p.pass_records} records held none (skipped: {skipped})")

  def __next__(self) -> dict[str, np.ndarray]:
    b, p = self.p.batch_size, self.p.seq_len
    out = {"tokens": np.full((b, p), self.p.tokenizer.pad_id, np.int32),
           "mask": np.zeros((b, p), bool), "loss_mask": np.zeros((b, p), bool),
           "positions": np.zeros((b, p), np.int32), "segment_ids": np.zeros((b, p), np.int32)}
    k = self.p.distill_top_k
    if k:
      out.update(top_ids=np.zeros((b, p, k), np.int32),
                 top_logprobs=np.zeros((b, p, k), np.float32),
                 teacher_mask=np.zeros((b, p), bool))
    fill, segments = [0] * b, [0] * b
    placed = True
    while placed:  # Passes over the window until none of its documents fits any more.
      self._refill()
      placed, keep = False, []
      for record in self._window:
        doc = record[2]
        n = len(doc["ids"])
        r = next((r for r in range(b) if fill[r] + n <= p), None)
        if r is None:
          keep.append(record)
          continue
        s = slice(fill[r], fill[r] + n)
        segments[r] += 1
        out["tokens"][r, s] = doc["ids"]
        out["mask"][r, s] = True
        out["loss_mask"][r, s] = doc["targets"]
        out["positions"][r, s] = np.arange(n)
        out["segment_ids"][r, s] = segments[r]
        if k:
          for name in ("top_ids", "top_logprobs", "teacher_mask"):
            out[name][r, s] = doc[name]
        fill[r] += n
        placed = True
        self.counts["documents"] += 1
        self.counts["truncated"] += int(doc["truncated"])
      self._window = keep
    if not any(fill):
      raise StopIteration
    self.counts["tokens"] += sum(fill)
    self.counts["target_tokens"] += int(out["loss_mask"].sum())
    self.counts["padding"] += b * p - sum(fill)
    return out

  def get_state(self) -> dict:
    """grain's position before the oldest unplaced document, which later records are pending."""
    if self._window:
      first = self._window[0][0]
      grain_state = self._window[0][1]
      read = self._next_record - first
      pending = [number - first for number, _, _ in self._window]
    else:
      grain_state, read, pending = dict(self._it.get_state()), 0, []
    return {"grain": grain_state, "read": read, "pending": pending, "counts": dict(self.counts),
            **self.p.fingerprint}

  def set_state(self, state: dict) -> None:
    """Resumes exactly at a state from get_state on the same host and configuration."""
    diff = {k: (state.get(k), v) for k, v in self.p.fingerprint.items() if state.get(k) != v}
    if diff:
      raise ValueError(f"iterator state is for another configuration: {diff} (saved, current)")
    self._it.set_state(dict(state["grain"]))
    self._window, self._next_record, self._exhausted = [], 0, False
    pending = set(state["pending"])
    for k in range(state["read"]):  # Re-read the window; records already used are passed over.
      record = self._read()
      if record is None:
        raise ValueError("iterator state points past the end of the data")
      if k in pending:
        self._window.append(record)
    self.counts = collections.Counter(state["counts"])


def check_mixture(tasks: list[str], weights: dict, source: str, tolerance: float = 0.05) -> None:
  """Fails, before any work, when a prompt file's task mixture is not the configured
  data.task_weights (a share more than `tolerance` off): the run would train on a mixture it
  was not planned on. The weights only check the file; its rows are the mixture."""
  if not weights:
    return
  total = sum(weights.values())
  actual = {t: tasks.count(t) / len(tasks) for t in sorted(set(tasks) | set(weights))}
  far = {t: (round(actual[t], 3), round(weights.get(t, 0) / total, 3)) for t in actual
         if abs(actual[t] - weights.get(t, 0) / total) > tolerance}
  if far:
    raise ValueError(
        f"{source}: task shares {({t: round(v, 3) for t, v in actual.items()})} are not "
        f"data.task_weights' (task: (file, configured) {far}, more than {tolerance} off). "
        "The file's rows are the mixture: change the file, or the weights to its shares")
