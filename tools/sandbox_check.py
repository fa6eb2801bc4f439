"""Self-check of the code sandbox: run hostile programs and report whether each was contained.

Run it on a new machine before trusting code rewards there:
  python tools/sandbox_check.py --mode auto
The tests run it in both modes. Limits are small, so a containment failure cannot hurt the
machine: a fork bomb is capped at a few processes, and survivors are killed here afterwards.
Stdlib and sandbox.py only, so it also runs from an unprivileged copy (see the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from r1jax.rewards import sandbox

SMALL = sandbox.Limits(timeout_s=1.5, memory_mb=256, nproc=12, fsize_mb=1,
                       max_output_bytes=1 << 16)
# Attacks that only namespaces can stop: in rlimit mode the program runs as the trainer's user.
NAMESPACE_ONLY = ("write_outside", "read_proc_environ", "network", "unix_socket", "kill_other")
_SECRET_VAR = "R1JAX_SANDBOX_CHECK_SECRET"

_SOURCES = {
    "infinite_loop": "while True:\n    pass\n",
    "sleep_past_timeout": "import time\ntime.sleep(60)\n",
    "fork_bomb": """\
        import os, time
        end = time.time() + 30
        while time.time() < end:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
        """,
    "memory_bomb": """\
        chunks = []
        try:
            while True:
                chunks.append(bytearray(10 ** 7))
        except MemoryError:
            print("allocated_mb", len(chunks) * 10)
            raise
        """,
    "process_count": """\
        import os, time
        children = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
            except OSError:
                pass
        print("children", children)
        """,
    "giant_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "daemon": """\
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{token}"])
            os._exit(0)
        print("parent done")
        """,
    "kill_parent": """\
        import os, signal
        try:
            os.kill(os.getppid(), signal.SIGKILL)
        except OSError as e:
            print("denied", e.errno)
        """,
    "kill_other": """\
        import os, signal
        os.kill({canary}, signal.SIGKILL)
        print("KILLED")
        """,
    "read_env": "import os\nprint(dict(os.environ))\n",
    "read_proc_environ": """\
        for pid in ("1", "{trainer}"):
            try:
                print(open("/proc/" + pid + "/environ").read())
            except OSError as e:
                print("denied", e.errno)
        """,
    "write_outside": """\
        import os
        for action in (lambda: open({outside!r}, "w").write("x"),
                       lambda: open({victim!r}, "w").write("overwritten"),
                       lambda: os.remove({victim!r}),
                       lambda: open({victim_dir!r} + "/new.txt", "w").write("x"),
                       lambda: open("/dev/shm/" + {token!r}, "w").write("x")):
            try:
                action()
            except OSError as e:
                print("blocked", e.errno)
        open("inside.txt", "w").write("fine")
        print(open("inside.txt").read())
        """,
    "network": """\
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=0.5).sendall(b"hi")
            print("CONNECTED")
        except OSError as e:
            print("no network", e.errno)
        """,
    "unix_socket": """\
        import socket
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect({unix_path!r})
            s.sendall(b"hi")
            print("CONNECTED")
        except OSError as e:
            print("no socket", e.errno)
        """,
}


def _survivors(token: str) -> list[int]:
  """Processes left by a finished run (cwd in a deleted sandbox dir, or carrying token); killed."""
  found = []
  for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == os.getpid():
      continue
    try:
      cwd = os.readlink(f"/proc/{name}/cwd")
      with open(f"/proc/{name}/cmdline", "rb") as f:
        cmdline = f.read()
    except OSError:
      continue
    if ("r1jax-sandbox-" in cwd and cwd.endswith("(deleted)")) or token.encode() in cmdline:
      found.append(int(name))
  for pid in found:
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
  return found


def _scratch_with_victim() -> tuple[str, str, str]:
  """(scratch dir, world-writable victim dir, victim file): what write attacks aim at."""
  scratch = tempfile.mkdtemp(prefix="r1jax-check-")
  victim_dir = os.path.join(scratch, "victim")
  os.mkdir(victim_dir)
  os.chmod(scratch, 0o755)
  os.chmod(victim_dir, 0o777)  # World-writable: only read-only mounts can protect it.
  victim = os.path.join(victim_dir, "keep.txt")
  with open(victim, "w") as f:
    f.write("precious")
  os.chmod(victim, 0o666)
  return scratch, victim_dir, victim


def run_suite(mode: str = "auto", limits: sandbox.Limits = SMALL) -> dict[str, dict]:
  """Runs every attack; returns {name: {contained, required, status, wall_s, detail}}."""
  mode = sandbox.resolve_mode(mode)
  token = "r1jax-check-" + secrets.token_hex(6)
  secret = secrets.token_hex(16)
  scratch, victim_dir, victim = _scratch_with_victim()
  outside = os.path.join(tempfile.gettempdir(), token)
  listener = socket.create_server(("127.0.0.1", 0))
  listener.settimeout(0.2)
  unix_path = os.path.join(scratch, "service.sock")  # A world-writable local service.
  unix_listener = socket.socket(socket.AF_UNIX)
  unix_listener.bind(unix_path)
  unix_listener.listen()
  unix_listener.settimeout(0.2)
  os.chmod(unix_path, 0o777)
  canary = subprocess.Popen(["sleep", "60"])
  os.environ[_SECRET_VAR] = secret
  fmt = dict(token=token, canary=canary.pid, trainer=os.getpid(), outside=outside,
             victim=victim, victim_dir=victim_dir, port=listener.getsockname()[1],
             unix_path=unix_path)
  report = {}
  try:
    for name, template in _SOURCES.items():
      source = textwrap.dedent(template)
      for key, value in fmt.items():
        source = source.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}",
                                                                         str(value))
      start = time.monotonic()
      result = sandbox.run_python(source, limits=limits, mode=mode)
      wall = time.monotonic() - start
      time.sleep(0.05)  # Let the kernel finish tearing a namespace down before we look.
      survivors = _survivors(token)
      out = result.stdout
      bounded = wall < limits.timeout_s + 4 and not survivors
      contained = bounded and {
          "infinite_loop": result.status in ("timeout", "signal"),
          "sleep_past_timeout": result.status == "timeout",
          "fork_bomb": result.status in ("timeout", "signal"),
          "memory_bomb": result.status in ("error", "signal")
                         and _number_after("allocated_mb", out) < limits.memory_mb,
          "process_count": result.status == "ok"
                           and _number_after("children", out) < limits.nproc,
          "giant_output": result.status in ("error", "signal")
                          and len(out) <= limits.max_output_bytes,
          "daemon": "parent done" in out,
          "kill_parent": "denied" in out or result.status == "sandbox_error",
          "kill_other": canary.poll() is None and "KILLED" not in out,
          "read_env": secret not in out and _SECRET_VAR not in out and "PATH" in out,
          "read_proc_environ": secret not in out,
          "write_outside": (out.count("blocked") == 5 and "fine" in out
                            and not os.path.exists(outside)
                            and not os.path.exists("/dev/shm/" + token)
                            and open(victim).read() == "precious"
                            and sorted(os.listdir(victim_dir)) == ["keep.txt"]),
          "network": "CONNECTED" not in out and not _accepted(listener),
          "unix_socket": "CONNECTED" not in out and not _accepted(unix_listener),
      }[name]
      report[name] = {"contained": bool(contained),
                      "required": mode == "namespace" or name not in NAMESPACE_ONLY,
                      "status": result.status, "wall_s": round(wall, 3),
                      "detail": (out[-300:] + result.stderr[-300:]) if not contained else "",
                      "survivors": survivors}
  finally:
    os.environ.pop(_SECRET_VAR, None)
    canary.kill()
    canary.wait()
    listener.close()
    unix_listener.close()
    for path in (outside, "/dev/shm/" + token):
      if os.path.exists(path):
        os.remove(path)
    sandbox._rmtree(scratch)  # pylint: disable=protected-access
  return report


def _number_after(word: str, out: str) -> float:
  """The number printed after `word`, or infinity if there is none (treated as not contained)."""
  for line in out.splitlines():
    if line.startswith(word + " "):
      return float(line.split()[1])
  return float("inf")


def _accepted(listener: socket.socket) -> bool:
  try:
    listener.accept()[0].close()
    return True
  except OSError:
    return False


def failures(report: dict[str, dict]) -> list[str]:
  """Names of attacks that the mode promises to contain but were not."""
  return [name for name, r in report.items() if r["required"] and not r["contained"]]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", default="auto", choices=sandbox.MODES)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args()
  report = run_suite(args.mode)
  if args.json:
    print(json.dumps(report))
  else:
    for name, r in report.items():
      verdict = "contained" if r["contained"] else ("FAILED" if r["required"] else
                                                     "not contained (needs namespaces)")
      print(f"{name:20s} {verdict:34s} {r['status']:14s} {r['wall_s']:.2f}s")
  return 1 if failures(report) else 0


if __name__ == "__main__":
  sys.exit(main())
