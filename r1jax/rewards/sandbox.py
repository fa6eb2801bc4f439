"""Runs an untrusted program under hard limits: the code-reward sandbox.

Two modes, picked by `mode="auto"`:
- "namespace" (root with util-linux `unshare`): new PID, network and mount namespaces, the
  program dropped to a fresh random uid/gid, every mount read-only except its own directory,
  and /tmp, /run, /var/tmp, /dev/shm hidden. It cannot see or signal the trainer, reach the
  network or local sockets, or write outside its directory, and everything it started dies
  with the namespace's init.
- "rlimit" (a non-root user, e.g. on a TPU VM): rlimits, a new session, a scrubbed environment
  and a subreaper that kills every descendant. Weaker: the program runs as the trainer's user,
  so it can reach the network, write where that user can, and signal that user's processes.
  As root without `unshare` it still drops to a random uid, since root ignores RLIMIT_NPROC.
Both put the program in a fresh temp dir with a wall-clock timeout and CPU, address-space,
process-count, file-size and open-file limits; jail.py enforces them inside.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MODES = ("auto", "namespace", "rlimit")
_JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
# Random uids from here up are assumed unused, so each run's RLIMIT_NPROC counts only itself.
_UID_BASE, _UID_SPAN = 1 << 20, 1 << 24
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed run."""

  timeout_s: float = 5.0  # wall clock, enforced by the jail (and a backstop here)
  cpu_s: float | None = None  # RLIMIT_CPU per process; None: ceil(timeout_s)
  memory_mb: int = 1024  # RLIMIT_AS per process
  nproc: int = 32  # processes + threads the program may have at once
  fsize_mb: int = 16  # largest file it may write (stdout included)
  nofile: int = 64  # open file descriptors
  max_output_bytes: int = 1 << 20  # stdout/stderr read back, the rest is dropped

  def __post_init__(self):
    for name in ("timeout_s", "memory_mb", "nproc", "fsize_mb", "nofile", "max_output_bytes"):
      if not getattr(self, name) > 0:
        raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunResult:
  """How a sandboxed run ended and what it printed (truncated to max_output_bytes)."""

  status: str  # "ok" (exit 0), "error" (exit != 0), "signal", "timeout", "sandbox_error"
  returncode: int | None
  signal: int | None
  stdout: str
  stderr: str
  wall_s: float
  mode: str

  @property
  def ok(self) -> bool:
    return self.status == "ok"


@functools.lru_cache(maxsize=None)
def namespaces_available() -> bool:
  """True when this process may create PID/network/mount namespaces with `unshare`."""
  if os.geteuid() != 0 or shutil.which("unshare") is None:
    return False
  try:
    probe = subprocess.run(_unshare_prefix() + ["true"], capture_output=True, timeout=10,
                           check=False)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return probe.returncode == 0


def resolve_mode(mode: str) -> str:
  """The concrete mode for "auto", or a validated explicit one."""
  if mode not in MODES:
    raise ValueError(f"unknown sandbox mode {mode!r}; expected one of {MODES}")
  if mode == "auto":
    return "namespace" if namespaces_available() else "rlimit"
  if mode == "namespace" and not namespaces_available():
    raise RuntimeError("namespace sandbox needs root and a working util-linux `unshare`")
  return mode


def _unshare_prefix() -> list[str]:
  # --kill-child: if unshare dies (e.g. the backstop kill), the jail and so the namespace die.
  return [shutil.which("unshare") or "unshare", "--pid", "--net", "--mount", "--fork",
          "--kill-child", "--mount-proc", "--"]


def _user_tasks(uid: int) -> int:
  """How many tasks (threads) `uid` runs now: RLIMIT_NPROC counts them all, not just ours."""
  count = 0
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/status") as f:
          fields = dict(line.split(":", 1) for line in f if ":" in line)
        if int(fields["Uid"].split()[0]) == uid:
          count += int(fields["Threads"])
      except (OSError, KeyError, ValueError):
        pass
  return count


def _env(workdir: str) -> dict[str, str]:
  """The whole environment the program sees: nothing inherited, so no secrets."""
  return {"PATH": _SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
          "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
          "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_capped(f, limit: int) -> str:
  f.seek(0)
  return f.read(limit).decode("utf-8", errors="replace")


def _rmtree(path: str) -> None:
  """Removes a run's directory even if the program made parts of it unwritable."""
  def retry(func, p, _):
    try:
      os.chmod(os.path.dirname(p), 0o700)
      os.chmod(p, 0o700)
      func(p)
    except OSError:
      pass
  shutil.rmtree(path, onerror=retry)


def run(argv: list[str], files: dict[str, str], stdin: str = "", limits: Limits = Limits(),
        mode: str = "auto") -> RunResult:
  """Runs argv (argv[0] an absolute executable) in a fresh dir holding `files`, under limits."""
  mode = resolve_mode(mode)
  if not argv or not os.path.isabs(argv[0]):
    raise ValueError(f"argv[0] must be an absolute path, got {argv[:1]}")
  workdir = os.path.realpath(tempfile.mkdtemp(prefix="r1jax-sandbox-"))
  uid = gid = None
  nproc = limits.nproc
  if os.geteuid() == 0:
    uid = gid = _UID_BASE + secrets.randbelow(_UID_SPAN)
  else:
    nproc += _user_tasks(os.geteuid())  # Same uid as us: leave room for our own tasks.
  report_r, report_w = os.pipe()
  start = time.monotonic()
  try:
    for name, text in files.items():
      if os.path.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"sandbox file names must be relative, got {name!r}")
      with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(text)
    if uid is not None:
      for p in [workdir] + [os.path.join(workdir, n) for n in files]:
        os.chown(p, uid, gid)
    cfg = {"dir": workdir, "argv": argv, "env": _env(workdir), "uid": uid, "gid": gid,
           "report_fd": report_w, "isolate_fs": mode == "namespace",
           "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb,
                      "cpu_s": limits.cpu_s or math.ceil(limits.timeout_s), "nproc": nproc,
                      "fsize_mb": limits.fsize_mb, "nofile": limits.nofile}}
    jail = [sys.executable, "-I", "-S", _JAIL, json.dumps(cfg)]
    cmd = (_unshare_prefix() if mode == "namespace" else []) + jail
    # stdin/stdout/stderr are unlinked files outside workdir: the program cannot swap them for
    # links or FIFOs, and RLIMIT_FSIZE caps how much it can write into them.
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, \
        tempfile.TemporaryFile() as ferr:
      fin.write(stdin.encode("utf-8"))
      fin.seek(0)
      proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, pass_fds=(report_w,),
                              env=_env(workdir), cwd=workdir, start_new_session=True)
      os.close(report_w)
      report_w = -1
      _wait_exit(proc.pid, limits.timeout_s + 10)  # Backstop: the jail times out first.
      _kill_group(proc.pid)  # Before reaping, so that the group id cannot have been reused.
      proc.wait()
      with os.fdopen(report_r, "rb") as f:
        report_r = -1
        reports = _parse_reports(f.read(1 << 16))
      if mode == "rlimit" and len(reports) == 1:
        _kill_group(reports[0]["pid"])  # The jail was killed before its program: kill that too.
      stdout = _read_capped(fout, limits.max_output_bytes)
      stderr = _read_capped(ferr, limits.max_output_bytes)
  finally:
    for fd in (report_r, report_w):
      if fd >= 0:
        os.close(fd)
    _rmtree(workdir)
  wall = time.monotonic() - start
  final = reports[-1] if len(reports) >= 2 else None
  if final is None:
    status, code, sig = "sandbox_error", proc.returncode, None
    stderr = f"sandbox: jail ended without a report (exit {proc.returncode})\n" + stderr
  else:
    code, sig = final["exit"], final["signal"]
    status = ("timeout" if final["timeout"] else "signal" if sig is not None
              else "ok" if code == 0 else "error")
  return RunResult(status, code, sig, stdout, stderr, wall, mode)


def _wait_exit(pid: int, timeout_s: float) -> None:
  """Waits until pid exits or timeout_s passes, without reaping it."""
  try:
    fd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    fd = None
  if fd is not None:
    try:
      select.select([fd], [], [], timeout_s)
    finally:
      os.close(fd)
    return
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
      return
    time.sleep(0.002)


def _parse_reports(data: bytes) -> list[dict]:
  out = []
  for line in data.decode(errors="replace").splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      pass
  return out


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except OSError:
    pass


def _others_can_run(path: str) -> bool:
  """True when a user with no relation to the file's owner may execute it."""
  real = os.path.realpath(path)
  parts = real.split(os.sep)
  dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
  try:
    return (all(os.stat(d).st_mode & 0o001 for d in dirs)
            and os.stat(real).st_mode & 0o005 == 0o005)
  except OSError:
    return False


@functools.lru_cache(maxsize=None)
def sandbox_python() -> str:
  """The interpreter for sandboxed programs: ours, unless the unprivileged uid cannot run it.

  As root the program runs under a random uid, which cannot run an interpreter installed under
  a private home (e.g. pyenv in /root); a world-executable python3 on PATH is used instead.
  """
  if os.geteuid() != 0 or _others_can_run(sys.executable):
    return sys.executable
  for d in _SAFE_PATH.split(":"):
    candidate = os.path.join(d, "python3")
    if _others_can_run(candidate):
      return candidate
  raise RuntimeError(f"no python3 that an unprivileged uid may execute (tried {sys.executable} "
                     f"and {_SAFE_PATH}); install one or pass `python`")


def run_python(source: str, stdin: str = "", limits: Limits = Limits(), mode: str = "auto",
               extra_files: dict[str, str] | None = None, entry: str = "main.py",
               python: str | None = None) -> RunResult:
  """Runs Python source as `main.py` (or `entry` among extra_files) in the sandbox."""
  files = {"main.py": source, **(extra_files or {})}
  # -I: ignore PYTHON* variables and the user site; -S is not used, so site-packages work.
  return run([python or sandbox_python(), "-I", entry], files, stdin, limits, mode)
