"""One process of a 2-process run on this machine, for tests/test_multihost.py:

  python tests/multihost_worker.py SCENARIO PORT PROCESS_ID OUT_DIR HEARTBEAT_S [SHUTDOWN_S]

`jax.distributed` on localhost, 2 CPU devices per process (4 in all). A RunError ends the
process with its exit status, as `python -m r1jax.main` does.
"""

import sys
from pathlib import Path


def _once(pid: int, out: Path) -> None:
  """The process-agreement helpers, then a one-time step that fails on process 0."""
  from r1jax.core import errors, multihost
  value = multihost.run_once("prepare", lambda: {"rows": 3})
  assert value == {"rows": 3}, value
  multihost.barrier("after-prepare", timeout_s=30)
  assert multihost.gather_json({"p": pid}) == [{"p": 0}, {"p": 1}]
  assert multihost.any_process(pid == 1) and not multihost.any_process(False)
  assert multihost.sum_over_processes({"rows": 2, f"bad_{pid}": 1}) == {
      "rows": 4.0, "bad_0": 1.0, "bad_1": 1.0}

  def bad():
    raise errors.DataError("data: row 7 of prompts.jsonl is not JSON")
  multihost.run_once("bad-data", bad)  # raises on both processes
  (out / f"went-on-{pid}").write_text("")


def _alone(pid: int, out: Path) -> None:
  """Process 1 fails on its own (an error the other never sees) and leaves as `python -m
  r1jax.main` does; process 0 waits for it in a collective."""
  if pid == 1:
    from r1jax import main as r1jax_main  # pylint: disable=import-outside-toplevel
    r1jax_main._fail(1)  # pylint: disable=protected-access
  from r1jax.core import multihost
  multihost.any_process(False)
  (out / f"went-on-{pid}").write_text("")


SCENARIOS = {"once": _once, "alone": _alone}


def main() -> None:
  scenario, port, pid, out, heartbeat = sys.argv[1:6]
  shutdown = int(sys.argv[6]) if len(sys.argv) > 6 else 10
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  from r1jax.core import errors, multihost
  multihost.initialize(multihost.Cluster(
      coordinator=f"localhost:{port}", num_processes=2, process_id=int(pid),
      heartbeat_timeout_s=int(heartbeat), shutdown_timeout_s=shutdown, init_timeout_s=60))
  try:
    SCENARIOS[scenario](int(pid), Path(out))
  except errors.RunError as e:
    print(f"{type(e).__name__} (exit {e.exit_code}): {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  main()
