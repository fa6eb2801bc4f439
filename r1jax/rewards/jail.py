"""Init process of one sandboxed run; executed as a script (`python -I -S jail.py CONFIG_JSON`).

It runs inside the namespaces that sandbox.py created (or none in rlimit mode), still with the
caller's privileges, and:
1. namespace mode: hides /tmp, /run, … under empty tmpfs and makes every mount read-only
   except the run's directory, so it can write nowhere else nor reach unix sockets there;
2. becomes a child subreaper, so daemons that double-fork are reparented to it, not to init;
3. forks the program: new session (no controlling tty), rlimits, unprivileged uid/gid, a
   parent-death signal, no inherited fds, then exec with a scrubbed environment;
4. waits for it up to the wall-clock timeout, then SIGKILLs its process group and every
   remaining descendant, and reports {"exit", "signal", "timeout", …} as JSON on the report fd.
Stdlib only and no r1jax import: it must start fast and trust nothing outside itself.
"""

import ctypes
import json
import os
import re
import resource
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)
_HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")


def _prctl(option: int, value: int) -> None:
  if _libc.prctl(option, value, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), f"prctl({option})")


def _mount(source, target: str, flags: int, fstype: str | None = None,
           data: str | None = None) -> None:
  args = [None if x is None else x.encode() for x in (source, target, fstype)]
  if _libc.mount(args[0], args[1], args[2], flags, None if data is None else data.encode()):
    raise OSError(ctypes.get_errno(), f"mount {target}")


def _mount_points() -> list[tuple[str, int]]:
  """(mount point, flags to keep) for every mount visible in this mount namespace."""
  out = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      fields = line.split()
      point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040
      opts = fields[5].split(",")
      keep = ((_MS_NOSUID if "nosuid" in opts else 0) | (_MS_NODEV if "nodev" in opts else 0)
              | (_MS_NOEXEC if "noexec" in opts else 0))
      out.append((point, keep))
  return out


def _isolate_filesystem(workdir: str) -> None:
  """In this (private) mount namespace: hide the shared scratch dirs, make every mount read-only
  except workdir, which keeps its path.

  Read-only mounts stop writes but not connect() to world-writable unix sockets, which live in
  /run and /tmp (dbus, X11); so those dirs get an empty tmpfs on top.
  """
  _mount(None, "/", _MS_REC | _MS_PRIVATE)
  keep_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)  # Still reachable once /tmp is hidden.
  for hidden in _HIDDEN_DIRS:
    if os.path.isdir(hidden) and not os.path.islink(hidden):
      _mount("tmpfs", hidden, _MS_NOSUID | _MS_NODEV, "tmpfs", "size=64k,mode=755")
  os.makedirs(workdir, exist_ok=True)  # A mount point for it inside the new tmpfs, if hidden.
  _mount(f"/proc/self/fd/{keep_fd}", workdir, _MS_BIND | _MS_NOSUID | _MS_NODEV)
  os.close(keep_fd)
  for point, keep in _mount_points():
    if point == workdir:
      continue
    try:
      _mount(None, point, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)
    except OSError:
      pass  # E.g. a mount hidden under another one; uid permissions still apply there.


def _children() -> list[int]:
  """Direct children of this process (including reparented orphans)."""
  me, kids = os.getpid(), []
  try:
    for tid in os.listdir(f"/proc/{me}/task"):
      with open(f"/proc/{me}/task/{tid}/children") as f:
        kids += [int(p) for p in f.read().split()]
    return kids
  except OSError:
    pass
  for name in os.listdir("/proc"):  # Kernels without CONFIG_PROC_CHILDREN.
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
            kids.append(int(name))
      except (OSError, IndexError, ValueError):
        pass
  return kids


def _kill_everything(pgid: int, budget_s: float = 3.0) -> None:
  """SIGKILLs the program's group and every descendant, reaping them, until none is left."""
  try:
    os.killpg(pgid, signal.SIGKILL)
  except OSError:
    pass
  deadline = time.monotonic() + budget_s
  while time.monotonic() < deadline:
    kids = _children()
    for pid in kids:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
    try:
      while os.waitpid(-1, os.WNOHANG)[0] > 0:
        pass
    except ChildProcessError:
      return
    if not kids:
      time.sleep(0.001)


def _exec_program(cfg: dict) -> None:
  """In the forked child: drop everything the program must not have, then exec it."""
  try:
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
      signal.signal(sig, signal.SIG_DFL)  # Python ignores some; the program gets defaults.
    os.setsid()
    os.chdir(cfg["dir"])
    lim = cfg["limits"]
    cpu = int(lim["cpu_s"])
    for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, (lim["memory_mb"] << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (lim["fsize_mb"] << 20,) * 2),
                         (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
                         (resource.RLIMIT_NPROC, (lim["nproc"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
      resource.setrlimit(which, value)
    if cfg.get("uid") is not None:
      os.setgroups([])
      os.setgid(cfg["gid"])
      os.setuid(cfg["uid"])
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # After setuid, which clears it.
    os.umask(0o077)
    os.closerange(3, 1 << 16)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
  except BaseException as e:  # pylint: disable=broad-except
    os.write(2, f"sandbox: cannot start program: {e!r}\n".encode())
  os._exit(126)


def main() -> None:
  cfg = json.loads(sys.argv[1])
  report = os.fdopen(cfg["report_fd"], "w")
  _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # If unshare or the worker dies, so do we.
  _prctl(_PR_SET_CHILD_SUBREAPER, 1)
  if cfg["isolate_fs"]:
    _isolate_filesystem(cfg["dir"])
  signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
  start = time.monotonic()
  pid = os.fork()
  if pid == 0:
    _exec_program(cfg)
  report.write(json.dumps({"pid": pid}) + "\n")
  report.flush()
  deadline = start + cfg["limits"]["timeout_s"]
  status, timed_out = None, False
  while status is None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      timed_out = True
      try:
        os.killpg(pid, signal.SIGKILL)
      except OSError:
        os.kill(pid, signal.SIGKILL)  # It left its group; the group sweep below finds the rest.
      status = os.waitpid(pid, 0)[1]
      break
    signal.sigtimedwait([signal.SIGCHLD], remaining)
    try:  # Reap everything that exited: the program, or orphans reparented to us.
      while True:
        reaped, st = os.waitpid(-1, os.WNOHANG)
        if reaped == 0:
          break
        if reaped == pid:
          status = st
    except ChildProcessError:
      pass
  wall = time.monotonic() - start
  _kill_everything(pid)
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  report.write(json.dumps({
      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
      "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
      "timeout": timed_out, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")
  report.flush()


if __name__ == "__main__":
  main()
