"""Data files (jsonl, a JSON array, CSV, parquet) read into one row schema, with adapters.

Every row, whatever its source, becomes
  {"id": str, "question": str, "gold": str, "task": "math"|"code"|"general"|…, "meta": dict}
where meta keeps the remaining fields (level, subject, url, solution, …), `meta["line"]` (the
1-based line / row number, so a bad prompt found later can still be reported by its line) and,
for code rows, `meta["tests"]` (a list of {"input", "output"}).

A row that cannot be used becomes a `BadRow` (logged with its line number) instead of an
exception: a long run must never die on one malformed line, and must never drop one silently.
"""

from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import re
from typing import Any, Callable, Iterator

from r1jax.core import storage
from r1jax.core.errors import DataError
from r1jax.core.storage import Path
from r1jax.data.answers import boxed_contents, strip_wrappers

log = logging.getLogger(__name__)
# A task is any lowercase name (math, code, general, unsafe, …): the reward spec says what
# judges it, and refuses a task it does not judge.
_TASK_NAME = re.compile(r"[a-z][a-z0-9_]*")
_GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclasses.dataclass(frozen=True)
class BadRow:
  """A skipped row: its 1-based line (or parquet row) number, a reason key, and details."""

  index: int
  reason: str  # a short key (e.g. "missing_field"), so counts can be grouped by it
  detail: str = ""


class RowError(ValueError):
  """Raised by an adapter for an unusable row; becomes a BadRow."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


def log_bad_row(source: str | Path, bad: BadRow) -> None:
  """Logs one skipped row with where it came from."""
  log.warning("skipping %s:%d: %s%s", source, bad.index, bad.reason,
              f" ({bad.detail})" if bad.detail else "")


# ----------------------------------------------------------------------------- raw records


def file_format(path: Path) -> str:
  """'parquet', 'json' (one array), 'jsonl' or 'csv', read from the content, then the name.

  A JSON array is an array however its elements are laid out over lines; a file named
  .parquet that is not one is refused rather than read as text.
  """
  with path.open("rb") as f:
    head = f.read(4096)
  if head.startswith(b"PAR1"):
    return "parquet"
  if path.suffix == ".parquet":
    raise DataError(f"{path} is named .parquet but is not a parquet file")
  text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
  if text.startswith(b"["):
    return "json"
  if path.suffix in (".csv", ".tsv") and not text.startswith(b"{"):
    return "csv"
  return "jsonl"


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
  """(row number, parsed row or a RowError) per row, whatever the file's format.

  jsonl: per non-blank line, numbered by line (blank lines are not rows). A JSON array: per
  element, numbered from 1; an array that does not parse stops (DataError). CSV / TSV: per
  record, numbered by the line it ends on. Parquet: per row. A UTF-8 BOM and CRLF line ends
  are read the same everywhere.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no data file at {path}")
  fmt = file_format(path)
  if fmt == "parquet":
    yield from enumerate(read_parquet(path), start=1)
  elif fmt == "json":
    try:
      elements = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{path} starts as a JSON array but does not parse as one: {e}") from None
    for i, value in enumerate(elements, start=1):
      yield i, value if isinstance(value, dict) else RowError("not_object", type(value).__name__)
  elif fmt == "csv":
    with io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
      for row in reader:
        yield reader.line_num, row
  else:
    with path.open("rb") as f:
      for i, raw in enumerate(f, start=1):
        if raw.strip():
          yield i, parse_json_line(raw)


def parse_json_line(raw: bytes | str) -> Any:
  """One jsonl line -> a dict, or a RowError describing why not (never raises)."""
  try:
    value = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return RowError("malformed_json", str(e)[:120])
  if not isinstance(value, dict):
    return RowError("not_object", type(value).__name__)
  return value


def data_paths(path: str | Path) -> list[Path]:
  """The files of a data field: one path, or several joined by commas ("a.jsonl,b.jsonl")."""
  paths = [Path(p.strip()) for p in str(path).split(",") if p.strip()]
  if not paths:
    raise FileNotFoundError(f"no data file named in {str(path)!r}")
  return paths


def record_source(path: str | Path) -> Any:
  """Random access to a file's (row number, row) records: jsonl by byte offsets (a multi-GB
  file costs 8 bytes a line), the other formats read whole. Several comma-joined files are
  read as one, in order (ConcatSource)."""
  paths = data_paths(path)
  for p in paths:
    if not p.is_file():
      raise FileNotFoundError(f"no data file at {p}")
  one = [JsonlSource(p) if file_format(p) == "jsonl" else list(read_records(p)) for p in paths]
  return one[0] if len(one) == 1 else ConcatSource(paths, one)


class ConcatSource:
  """Several files' records as one source. Row numbers run on across the files (the second
  file's row 1 is the first file's last + 1), so a bad row's number stays one int;
  `locate` turns it back into (file, row)."""

  def __init__(self, paths: list[Path], sources: list):
    self.paths, self._sources = paths, sources
    self._starts = list(itertools.accumulate((len(x) for x in sources), initial=0))
    self._line_offsets = [0]
    for x in sources[:-1]:
      last = x[len(x) - 1][0] if len(x) else 0
      self._line_offsets.append(self._line_offsets[-1] + last)

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, i: int) -> tuple[int, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    j = bisect.bisect_right(self._starts, i) - 1
    line, raw = self._sources[j][i - self._starts[j]]
    return self._line_offsets[j] + line, raw

  def locate(self, line: int) -> tuple[Path, int]:
    """The file and its own row number of a combined row number."""
    j = bisect.bisect_left(self._line_offsets, line) - 1
    return self.paths[j], line - self._line_offsets[j]


def check_bad_share(source: str | Path, good: int, bad: list[BadRow], max_share: float) -> None:
  """DataError when more than `max_share` of the rows are unusable: the counts per reason and
  the first bad row. A long run must not train on what is left of a misread file."""
  total = good + len(bad)
  if not bad or len(bad) <= max_share * total:
    return
  first = min(bad, key=lambda b: b.index)
  counts = dict(collections.Counter(b.reason for b in bad).most_common())
  raise DataError(
      f"{source}: {len(bad)} of {total} rows are unusable ({len(bad) / total:.1%} > "
      f"max_bad_share {max_share:.1%}): {counts}; the first is row {first.index}: "
      f"{first.reason}{f' ({first.detail})' if first.detail else ''}. Fix the file, or raise "
      "max_bad_share.")


def read_parquet(path: Path) -> list[dict]:
  """All rows of a parquet file as dicts (needs pyarrow)."""
  try:
    # Optional: pyarrow is not an r1jax dependency; only parquet inputs need it.
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); it is not "
                      "installed. jsonl files need nothing extra.") from e
  return pq.read_table(storage.local_file(path)).to_pylist()


class JsonlSource:
  """Random access to the lines of a jsonl file: (1-based line, raw bytes) by index.

  Only the byte offsets are held in memory, so a multi-GB SFT file costs 8 bytes per line;
  os.pread makes reads safe from grain's reader threads.
  """

  def __init__(self, path: str | Path):
    if not Path(path).is_file():
      raise FileNotFoundError(f"no data file at {path}")
    self.path = storage.local_file(path)  # reads by offset: an object is copied down once
    self._spans: list[tuple[int, int, int]] = []  # (line, offset, length) of non-blank lines
    offset = 0
    with open(self.path, "rb") as f:
      for line, raw in enumerate(f, start=1):
        if raw.strip():
          self._spans.append((line, offset, len(raw)))
        offset += len(raw)
    self._fd: int | None = None

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, i: int) -> tuple[int, bytes]:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    line, offset, length = self._spans[i]
    return line, os.pread(self._fd, length, offset)

  def __getstate__(self) -> dict:  # A file descriptor does not survive pickling.
    return {**self.__dict__, "_fd": None}

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)


# -------------------------------------------------------------------------------- adapters


def _text(row: dict, *keys: str) -> str:
  """The first present key's value, which must be a non-empty string."""
  for k in keys:
    if k in row and row[k] is not None:
      if not isinstance(row[k], str):
        raise RowError("bad_type", f"{k!r} is {type(row[k]).__name__}, not str")
      if not row[k].strip():
        raise RowError("empty_field", repr(k))
      return row[k]
  raise RowError("missing_field", " or ".join(repr(k) for k in keys))


def gold_text(value: Any) -> str:
  """A gold answer as a string: 27.0 -> '27', '025' -> '25', ' 3/4 ' -> '3/4'."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise RowError("unparsable_gold", f"gold of type {type(value).__name__}")
  if isinstance(value, float):
    value = str(int(value)) if value.is_integer() else repr(value)
  gold = str(value).strip()
  if re.fullmatch(r"-?0+\d+", gold):  # AIME pads to three digits; the model will write 25.
    gold = str(int(gold))
  if not gold:
    raise RowError("empty_gold")
  return gold


def _meta(row: dict, used: tuple[str, ...], line: int, adapter: str) -> dict:
  meta = {k: v for k, v in row.items() if k not in used}
  meta.update(line=line, adapter=adapter)
  return meta


def adapt_gsm8k(row: dict, line: int) -> dict:
  """GSM8K: question + answer ending in '#### N' -> gold N (thousands separators removed)."""
  question, answer = _text(row, "question"), _text(row, "answer")
  found = _GSM8K_ANSWER.findall(answer)
  if not found:
    raise RowError("unparsable_gold", "answer has no '#### N'")
  gold = gold_text(_THOUSANDS.sub("", found[-1]))
  meta = _meta(row, ("question", "answer", "id"), line, "gsm8k")
  meta["solution"] = answer
  return {"id": str(row.get("id", f"gsm8k-{line}")), "question": question, "gold": gold,
          "task": "math", "meta": meta}


def adapt_math(row: dict, line: int) -> dict:
  """MATH / MATH-500: problem + solution; gold = answer, else the solution's last \\boxed{}."""
  question, solution = _text(row, "problem"), _text(row, "solution")
  if row.get("answer") is not None:
    gold = gold_text(row["answer"])
  else:
    boxed = boxed_contents(solution)
    if not boxed:
      raise RowError("unparsable_gold", "no answer field and no \\boxed{} in solution")
    gold = gold_text(strip_wrappers(boxed[-1]))
  row_id = row.get("unique_id", row.get("id", f"math-{line}"))
  return {"id": str(row_id), "question": question, "gold": gold, "task": "math",
          "meta": _meta(row, ("problem", "answer", "id"), line, "math")}


def adapt_generic(row: dict, line: int, require_gold: bool = True) -> dict:
  """AIME / AMC / any {id?, question|problem|prompt, answer|gold, task?} row.

  require_gold=False: a math row without an answer gets gold '' (sampling with no verifier).
  """
  task = row.get("task", "math")
  if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
    raise RowError("bad_task", f"{task!r} is not a task name (lowercase letters, digits, _)")
  if task == "code":
    return adapt_code(row, line)
  question = _text(row, "question", "problem", "prompt")
  gold_key = next((k for k in ("answer", "gold") if row.get(k) is not None), None)
  if gold_key and task != "math" and row[gold_key] == "":
    gold_key = None  # a general row's empty answer: there is no gold, a reward model judges
  if gold_key is None and task == "math" and require_gold:
    raise RowError("missing_field", "'answer' or 'gold'")
  gold = gold_text(row[gold_key]) if gold_key else ""  # General prompts are judged by an RM.
  used = ("id", "question", "problem", "prompt", "answer", "gold", "task")
  return {"id": str(row.get("id", f"row-{line}")), "question": question, "gold": gold,
          "task": task, "meta": _meta(row, used, line, "generic")}


def adapt_code(row: dict, line: int) -> dict:
  """Code: question|prompt + tests [{input, output}, …]; gold is '' (the tests decide)."""
  question = _text(row, "question", "prompt", "problem")
  tests = row.get("tests")
  if tests is None:
    raise RowError("missing_field", "'tests'")
  if (not isinstance(tests, list) or not tests or not all(
      isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)
      for t in tests)):
    raise RowError("bad_tests", "tests must be a non-empty list of {input: str, output: str}")
  meta = _meta(row, ("id", "question", "prompt", "problem", "tests", "task"), line, "code")
  meta["tests"] = [{"input": t["input"], "output": t["output"]} for t in tests]
  return {"id": str(row.get("id", f"code-{line}")), "question": question, "gold": "",
          "task": "code", "meta": meta}


ADAPTERS: dict[str, Callable[[dict, int], dict]] = {
    "gsm8k": adapt_gsm8k, "math": adapt_math, "generic": adapt_generic, "code": adapt_code,
    "aime": adapt_generic, "amc": adapt_generic,
}


def detect_adapter(row: dict, require_gold: bool = True) -> str | None:
  """The adapter a row's fields point to, or None if none fits."""
  if "tests" in row or row.get("task") == "code":
    return "code"
  has_q = any(k in row for k in ("question", "problem", "prompt"))
  if "problem" in row and "solution" in row and "id" not in row:
    return "math"  # MATH rows carry unique_id (or nothing), competition rows an id.
  if isinstance(row.get("answer"), str) and "####" in row["answer"] and "question" in row:
    return "gsm8k"
  if has_q and ("answer" in row or "gold" in row or "task" in row or not require_gold):
    return "generic"
  return None


def load_rows(path: str | Path, adapter: str = "auto", limit: int | None = None,
              require_gold: bool = True) -> tuple[list[dict], list[BadRow]]:
  """Reads a problem file into normalised rows and the bad rows skipped (each logged).

  adapter="auto" picks one adapter per file from its first row that fits one, so a later row
  with a missing field is reported as such rather than silently handled as another format.
  `limit` stops after that many good rows. require_gold=False accepts generic math rows
  without an answer (gold ''), for sampling with no verifier.
  """
  if adapter != "auto" and adapter not in ADAPTERS:
    raise ValueError(f"unknown adapter {adapter!r}; known: auto, {', '.join(sorted(ADAPTERS))}")
  rows: list[dict] = []
  bad: list[BadRow] = []
  pending: list[tuple[int, dict]] = []  # Rows seen before auto-detection succeeded.
  chosen = None if adapter == "auto" else ADAPTERS[adapter]

  def add(line: int, record: Any) -> None:
    try:
      if isinstance(record, RowError):
        raise record
      if chosen is adapt_generic and not require_gold:
        rows.append(adapt_generic(record, line, require_gold=False))
      else:
        rows.append(chosen(record, line))
    except RowError as e:
      bad.append(BadRow(line, e.reason, e.detail))
      log_bad_row(path, bad[-1])

  for line, record in read_records(path):
    if limit is not None and len(rows) >= limit:
      break
    if chosen is None and isinstance(record, dict):
      name = detect_adapter(record, require_gold)
      if name is None:
        pending.append((line, record))
        continue
      chosen = ADAPTERS[name]
      log.info("%s: detected the %s format at line %d", path, name, line)
      for held in pending:
        add(*held)
      pending = []
    if chosen is None:  # Not a dict: bad before any format is known.
      bad.append(BadRow(line, record.reason, record.detail))
      log_bad_row(path, bad[-1])
    else:
      add(line, record)
  for line, _ in pending:  # No row in the file fitted any format.
    bad.append(BadRow(line, "unknown_format", "fields fit no adapter"))
    log_bad_row(path, bad[-1])
  bad.sort(key=lambda b: b.index)
  if limit is not None:
    rows = rows[:limit]
  if bad:
    log.warning("%s: %d rows loaded, %d skipped", path, len(rows), len(bad))
  return rows, bad


def check_unique_ids(rows: list[dict], source: str | Path) -> None:
  """A benchmark whose ids repeat would grade (and count) those rows twice: refuse it."""
  seen, repeated = set(), []
  for row in rows:
    if row["id"] in seen:
      repeated.append(row["id"])
    seen.add(row["id"])
  if repeated:
    raise ValueError(f"{source}: {len(repeated)} duplicate row ids (first: "
                     f"{sorted(set(repeated))[:5]}); ids must be unique to grade by id")
