"""Entry point: `python -m r1jax.main --config=experiments/NAME.py[:arg] --workdir=DIR`.

Parses the (locked) experiment config with absl's config_flags, so
`--config.grpo.beta=0.0` overrides a field and a typo fails before any work.
On multi-host TPU / GPU slices pass `--distributed` to initialise
`jax.distributed` first; on a CPU-only machine the mesh gets one device per core
(`--cpu_devices=N` to choose, 0 for JAX's single device). Then it dispatches on `config.stage`.

Exit status (r1jax/core/errors.py): 0 when the stage finished; 75 (EX_TEMPFAIL) when it
stopped on SIGTERM after saving a checkpoint, so a scheduler or retry loop restarts it
(re-running the same command resumes); 64 config refused, 65 data refused, 69 non-finite
training, 73 workdir held by another run, 74 a checkpoint save failed; 1 any other error.
"""

from __future__ import annotations

import atexit
import difflib
import os
import sys
import threading

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from r1jax.core import errors, multihost, sharding
from r1jax.core.config import config_from_file
from r1jax.core.storage import Path
from r1jax.stages import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file: experiments/NAME.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, checkpoints and logs go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "--distributed: host:port of process 0 where JAX cannot detect "
    "the cluster itself (Cloud TPU VMs, Slurm and Open MPI need none), with --num_processes "
    "and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "--distributed: processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "--distributed: this process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "--distributed: a process silent this long is lost, and every "
    "other process ends (non-zero, naming it) instead of waiting in a collective.")
_SHUTDOWN = flags.DEFINE_integer(
    "shutdown_timeout_s", 300, "--distributed: how long exit waits for the other processes.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1,
    "CPU runs: expose this many CPU devices so the mesh's batch axes put rows on every core; "
    "XLA:CPU runs one device's small decode matmuls on about one core. -1 (default): one per "
    "core, unless XLA_FLAGS sets a host device count; 0 keeps JAX's default of one. No "
    "effect on GPU/TPU.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = errors.EXIT_PREEMPTED  # sysexits.h EX_TEMPFAIL: "try again later"


def _config_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted field path of a ConfigDict (groups and leaves)."""
  out = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    out.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      out += _config_paths(value, path + ".")
  return out


def _close(a: str, b: str) -> float:
  """How alike two field names are (1.0: the same)."""
  return 1.0 if a == b else difflib.SequenceMatcher(None, a, b).ratio()


def override_problem(config: ml_collections.ConfigDict, field: str, label: str) -> str | None:
  """One or two plain lines for an override of a field the config does not have, else None.

  Line one names the field and, where one exists, where it lives: the same path under
  another group (a pipeline's stage groups), or a near spelling of each part. Where nothing
  is near, line two lists what the deepest group that does exist holds (for a pipeline's
  top level: its stage groups)."""
  parts = field.split(".")
  node, depth = config, 0
  while depth < len(parts) and isinstance(node, ml_collections.ConfigDict) and parts[depth] in node:
    node, depth = node[parts[depth]], depth + 1
  if depth == len(parts):
    return None
  head = f"--config.{field}: {label} has no field {field!r}"
  if not isinstance(node, ml_collections.ConfigDict):
    return f"{head}; --config.{'.'.join(parts[:depth])} is a value, not a group"
  paths = _config_paths(config)
  homes = sorted(p for p in paths if p.endswith("." + field))
  if homes:
    return head + "; it lives at " + " or ".join(f"--config.{h}" for h in homes)
  near = []
  for p in paths:
    tail = p.split(".")[-len(parts):]
    if len(tail) == len(parts):
      score = min(_close(a, b) for a, b in zip(tail, parts))
      if score >= 0.75:
        near.append((-score, p.count("."), p))
  if near:
    best = [f"--config.{p}" for *_, p in sorted(near)[:4]]
    return f"{head}; did you mean {' or '.join(best)}?"
  group = f"--config.{'.'.join(parts[:depth])}" if depth else "the top level"
  keys = sorted(node.keys())
  shown = ", ".join(keys[:16]) + (", …" if len(keys) > 16 else "")
  return f"{head}\n{group} holds: {shown}"


def check_argv(argv: list[str]) -> str | None:
  """A clear message for a missing config file or an override the config does not have, else
  None. absl reports both with a traceback whose last line hides the cause; this runs first.
  """
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None  # absl says the flag is required
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    return f"no such config file: {path}"
  config = config_from_file(path, arg or None)
  for a in argv:
    if a.startswith("--config."):
      problem = override_problem(config, a[len("--config."):].split("=", 1)[0], path)
      if problem:
        return problem
  return None


FAILED_ALIKE_WAIT_S = 10.0  # how long a failed process waits to see the others fail too


def _exit(code: int) -> None:
  """sys.exit, unless a thread that is not a daemon is still alive: after a failed save,
  orbax's signalling threads wait minutes for a signal that never comes, and would hold the
  process that long. Everything of the run is written by now: exit at once instead."""
  main_thread = threading.main_thread()
  if any(t.is_alive() and not t.daemon and t is not main_thread for t in threading.enumerate()):
    atexit._run_exitfuncs()  # pylint: disable=protected-access  (os._exit skips them)
    _now(code)
  sys.exit(code)


def _now(code: int) -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _fail(code: int) -> None:
  """A failed run's exit. With several processes that all failed alike (an error every one
  raised: bad data, a failed one-time step) they meet at a barrier and exit normally. A
  process that failed alone would wait at JAX's shutdown barrier while the others wait in a
  collective (both for minutes): it exits at once instead, without the shutdown, so the
  coordination service stops hearing it and ends the others after the heartbeat timeout."""
  if jax.process_count() > 1:
    try:
      multihost.barrier("failed", timeout_s=FAILED_ALIKE_WAIT_S)
    except multihost.BarrierTimeout as e:
      if e.lost:  # its error came from a peer that died (a collective's connection reset)
        logging.error("process %d stops: lost process %s (its heartbeat lapsed)",
                      jax.process_index(), ", ".join(map(str, e.lost)))
      else:
        logging.error("process %d failed alone; exiting now, the others stop within the "
                      "heartbeat timeout (%s)", jax.process_index(), e)
      _now(code)
  _exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cpu_devices = sharding.cpu_devices_to_request(
      _CPU_DEVICES.value, os.environ.get("XLA_FLAGS", ""),
      os.environ.get("JAX_NUM_CPU_DEVICES", ""))
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if _DISTRIBUTED.value:
    try:
      cluster = multihost.Cluster(
          coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
          process_id=_PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value,
          shutdown_timeout_s=_SHUTDOWN.value)
    except ValueError as e:
      raise app.UsageError(f"--distributed: {e}") from None
    multihost.initialize(cluster)
  logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    summary = run(_CONFIG.value, _WORKDIR.value)
  except errors.RunError as e:
    logging.exception("%s (exit %d): %s", type(e).__name__, e.exit_code, e)
    _fail(e.exit_code)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    logging.exception("process %d failed", jax.process_index())
    _fail(1)
  if isinstance(summary, dict) and summary.get("preempted"):
    logging.warning("preempted: checkpoint saved; exiting %d so the run is restarted",
                    EXIT_PREEMPTED)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  problem = check_argv(sys.argv[1:])
  if problem:
    sys.exit(problem)
  app.run(main)
