"""Streaming, resumable jsonl output of one host: files grow batch by batch, a kill loses
at most the batch being written, and a re-run continues exactly where the last commit was.

A work unit is a batch of prompts with a global index. For each finished batch the writer
appends its rows to the data files (`<name>-h<host>.jsonl`), fsyncs them, then appends one
line to `progress-h<host>.jsonl`: the batch index, its counts and every data file's size
after it. That line is the commit. On open, a torn last progress line is cut off and each
data file is truncated to the sizes the last whole line records, so rows of an uncommitted
batch (written before the kill, committed never) disappear and are written again, once.

`manifest.json` names the run (its settings and inputs). A folder holding another run's
files, or output files without a manifest, is refused rather than mixed.
"""

from __future__ import annotations

import json
from typing import Iterable

from r1jax.core import storage
from r1jax.core.config import config_changes
from r1jax.core.storage import Path

MANIFEST = "manifest.json"
PROGRESS = "progress"


def _fsync_append(path: Path, lines: Iterable[str]) -> int:
  """Appends lines to path (created if missing), fsyncs; returns the file size after."""
  storage.append(path, "".join(line + "\n" for line in lines).encode(), sync=True)
  return storage.size(path)


def claim_folder(out_dir: Path, manifest: dict, names: Iterable[str]) -> bool:
  """Makes out_dir this run's folder; returns whether it already was (a resume).

  Refuses (ValueError) a folder whose manifest names another run, or that holds output
  files but no manifest. The manifest is written atomically before any output file.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / MANIFEST
  ours = [p.name for n in (*names, PROGRESS) for p in storage.glob(out_dir, f"{n}-h*.jsonl")]
  if path.exists():
    changes = config_changes(json.loads(path.read_text()), manifest)
    if changes:
      raise ValueError(f"{out_dir} holds the output of another run ({'; '.join(changes[:8])}"
                       f"{'; …' if len(changes) > 8 else ''}). Use a new folder: rows of two "
                       "runs are never mixed in one.")
    return True
  if ours:
    raise ValueError(f"{out_dir} holds output files ({sorted(ours)[:4]}) but no {MANIFEST}: "
                     "they are not this run's. Use a new folder.")
  storage.write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))
  return False


class ShardWriter:
  """One host's data files plus its progress log; see the module docstring."""

  def __init__(self, out_dir: str | Path, host: int, names: Iterable[str]):
    self.dir = Path(out_dir)
    self.names = tuple(names)
    self.host = host
    self.progress_path = self._path(PROGRESS)
    self.committed: list[dict] = []  # the progress records, in commit order
    self._recover()

  def _path(self, name: str) -> Path:
    return self.dir / f"{name}-h{self.host:05d}.jsonl"

  def _recover(self) -> None:
    """Reads the commits; cuts a torn progress line and every data file back to the last one."""
    good_bytes, records = 0, []
    if self.progress_path.exists():
      raw = self.progress_path.read_bytes()
      for line in raw.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        try:
          record = json.loads(line)
        except ValueError:
          break
        records.append(record)
        good_bytes += len(line) + 1
      if good_bytes != len(raw):
        storage.truncate(self.progress_path, good_bytes)
    self.committed = records
    sizes = records[-1]["sizes"] if records else {}
    for name in self.names:
      path = self._path(name)
      keep = int(sizes.get(name, 0))
      size = storage.size(path) if path.exists() else keep
      if size < keep:
        raise ValueError(f"{path} is shorter ({size} bytes) than its last commit records "
                         f"({keep}): the folder was edited; use a new one")
      if size > keep:
        storage.truncate(path, keep)

  @property
  def done(self) -> set[int]:
    """Global indices of the batches already committed by this host."""
    return {r["batch"] for r in self.committed}

  def commit(self, batch: int, rows: dict[str, list[dict]], record: dict) -> None:
    """Appends a batch's rows (name -> rows), then its progress line (`record` + sizes)."""
    unknown = set(rows) - set(self.names)
    if unknown:
      raise ValueError(f"no output file named {sorted(unknown)}; have {self.names}")
    sizes = {}
    for name in self.names:
      path = self._path(name)
      lines = [json.dumps(r, ensure_ascii=False) for r in rows.get(name, ())]
      sizes[name] = _fsync_append(path, lines) if lines or path.exists() else 0
    entry = {**record, "batch": batch, "sizes": sizes}
    _fsync_append(self.progress_path, [json.dumps(entry)])
    self.committed.append(entry)


def read_rows(out_dir: str | Path, name: str) -> list[dict]:
  """Every host's committed rows of one output, host by host."""
  rows = []
  for path in storage.glob(out_dir, f"{name}-h*.jsonl"):
    rows += [json.loads(line) for line in path.read_text().splitlines() if line]
  return rows


def read_progress(out_dir: str | Path) -> list[dict]:
  """Every host's progress records (whole lines only)."""
  out = []
  for path in storage.glob(out_dir, f"{PROGRESS}-h*.jsonl"):
    for line in path.read_bytes().split(b"\n")[:-1]:
      try:
        out.append(json.loads(line))
      except ValueError:
        break
  return out
