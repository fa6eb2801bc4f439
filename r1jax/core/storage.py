"""Where a run's files live: a local folder, or an object store (`gs://bucket/run`, the usual
workdir of a Cloud TPU VM slice, whose hosts share no disk), through one path API
(`etils.epath`: the os module for local paths, fsspec for `gs://`, `s3://`, `az://`).

Every workdir, data and checkpoint path is an `epath.Path` (`path`). An object store has no
append, no atomic rename over an object, no advisory lock and no cheap recursive listing, so
the few operations that need one go through the helpers here, which keep the local behaviour
and give each its object-store form:
- `Appender`, `append`: an open in append mode locally; a rewrite of the object with the new
  bytes added (objects are immutable), for logs (metrics and TensorBoard events uploaded at
  most every `LOG_UPLOAD_S`; a kill loses at most that much of them) and generate's
  per-batch output files (rewritten per batch: fine to tens of MB);
- `write_atomic`: a temporary file and `os.replace` locally (a reader never sees half a
  file); a plain write remotely, where an object appears whole when its upload completes;
- `size`, `glob`, `files_under`: what pathlib's `stat().st_size`, `glob` and `rglob` gave,
  on both backends;
- `local_file`: a local file for a library that only opens local files (sentencepiece,
  safetensors' memory map, reads by offset), copied down from an object store once.
"""

from __future__ import annotations

import atexit
import fnmatch
import math
import os
import shutil
import tempfile
import time

from etils import epath

Path = epath.Path
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")
LOG_UPLOAD_S = 30.0  # a log on an object store is re-uploaded at most this often


def path(p: str | os.PathLike) -> epath.Path:
  """A local path or an object-store URI as one Path type (`gs://b/x` keeps its scheme; a
  pathlib.Path would fold it to `gs:/b/x`)."""
  return p if isinstance(p, epath.Path) else epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
  """True for an object-store URI (`gs://…`), False for a local path."""
  scheme, sep, _ = os.fspath(p).partition("://")
  return bool(sep) and scheme in REMOTE_SCHEMES


def absolute(p: str | os.PathLike) -> epath.Path:
  """`p` made absolute (an object-store URI already is)."""
  return path(p) if is_remote(p) else path(p).absolute()


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or folder to `dst` (which must not exist; its folder is made): a rename
  locally; an object store has no folders to rename, so each object is copied, then the
  source removed."""
  src, dst = path(src), path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(src):
    src.rename(dst)
    return
  for f in files_under(src) if src.is_dir() else [src]:
    target = dst / f.relative_to(src) if f != src else dst
    target.parent.mkdir(parents=True, exist_ok=True)
    f.copy(target)
  if src.is_dir():
    src.rmtree()
  else:
    src.unlink()


def size(p: str | os.PathLike) -> int:
  """Bytes in the file at `p` (a local one by os.stat: epath's looks up its owner's name,
  which fails for a user id with no account, as in containers run with `--user`)."""
  return int(path(p).stat().length) if is_remote(p) else os.stat(p).st_size


def glob(folder: str | os.PathLike, pattern: str) -> list[epath.Path]:
  """The entries of `folder` whose name matches `pattern`, sorted. epath's local glob joins
  the folder into the pattern, so a folder named `run[1]` would match nothing."""
  folder = path(folder)
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if fnmatch.fnmatchcase(p.name, pattern))


def size_and_mtime_ns(p: str | os.PathLike) -> tuple[int, int]:
  """(bytes, modification time in ns) of a file: a local one to the nanosecond, an object to
  the second (what object stores record)."""
  if is_remote(p):
    st = path(p).stat()
    return int(st.length), int(st.mtime) * 1_000_000_000
  st = os.stat(p)
  return st.st_size, st.st_mtime_ns


def append(p: str | os.PathLike, data: str | bytes, *, sync: bool = False) -> None:
  """Adds `data` at the end of the file at `p` (created if missing). `sync`: fsync a local
  file before returning (an object store's write is durable when it returns)."""
  log = Appender(p, binary=isinstance(data, bytes))
  log.write(data)
  log.close(sync=sync)


class Appender:
  """A file opened to add to its end (a log): a local file handle, or for an object store
  its content so far kept in memory and the object rewritten with the additions at a
  `flush` (at most once per `upload_every_s`: a long log is not uploaded whole at every
  step; `close` uploads what is left)."""

  def __init__(self, p: str | os.PathLike, binary: bool = False, upload_every_s: float = 0.0):
    self.path, self._binary, self._every = path(p), binary, upload_every_s
    self._file, self._tail, self._uploaded = None, [], -math.inf
    if is_remote(self.path):
      empty = b"" if binary else ""
      self._head = ((self.path.read_bytes() if binary else self.path.read_text())
                    if self.path.exists() else empty)
    else:
      self._file = open(self.path, "ab" if binary else "a",  # pylint: disable=consider-using-with
                        **({} if binary else {"encoding": "utf-8"}))

  def write(self, data: str | bytes) -> None:
    if self._file is not None:
      self._file.write(data)
    else:
      self._tail.append(data)

  def flush(self, force: bool = False) -> None:
    if self._file is not None:
      self._file.flush()
    elif self._tail and (force or time.monotonic() - self._uploaded >= self._every):
      self._head += (b"" if self._binary else "").join(self._tail)
      self._tail = []
      (self.path.write_bytes if self._binary else self.path.write_text)(self._head)
      self._uploaded = time.monotonic()

  def close(self, sync: bool = False) -> None:
    """Writes what is left; `sync`: fsyncs a local file first."""
    self.flush(force=True)
    if self._file is not None:
      if sync:
        os.fsync(self._file.fileno())
      self._file.close()
      self._file = None


def truncate(p: str | os.PathLike, length: int) -> None:
  """Cuts the file at `p` to its first `length` bytes (a torn tail after a kill)."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(p.read_bytes()[:length])
    return
  with open(p, "r+b") as f:
    f.truncate(length)
    f.flush()
    os.fsync(f.fileno())


def write_atomic(p: str | os.PathLike, data: str | bytes) -> None:
  """The whole file at `p` replaced by `data` at once: a reader sees the old or the new."""
  p = path(p)
  if is_remote(p):
    (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
    return
  tmp = p.with_name(p.name + ".tmp")
  (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)
  os.replace(tmp, p)


def files_under(folder: str | os.PathLike) -> list[epath.Path]:
  """Every file below `folder`, sorted (epath refuses `**` globs): locally os.walk, symlinked
  folders not followed, regular files only (as pathlib's rglob + is_file); on an object
  store every object under the prefix."""
  folder = path(folder)
  if not is_remote(folder):
    return sorted(path(os.path.join(root, name))
                  for root, _, names in os.walk(folder, followlinks=False) for name in names
                  if os.path.isfile(os.path.join(root, name)))
  out = []
  for p in folder.iterdir():
    out += files_under(p) if p.is_dir() else [p]
  return sorted(out)


_COPIES: dict[tuple[str, int, int], str] = {}  # (URI, bytes, mtime) -> its local copy


def local_file(p: str | os.PathLike) -> str:
  """A local filesystem path holding the file at `p`, for a library that opens only local
  files (random access by offset, a memory map): `p` itself when local, else a copy made
  once per process and version of the object, in a temporary folder removed at exit."""
  if not is_remote(p):
    return os.fspath(p)
  key = (os.fspath(p), *size_and_mtime_ns(p))
  if key not in _COPIES:
    folder = tempfile.mkdtemp(prefix="r1jax-copy-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    local = os.path.join(folder, path(p).name)
    with path(p).open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
    _COPIES[key] = local
  return _COPIES[key]
