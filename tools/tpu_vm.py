"""Run one r1jax command on a Cloud TPU VM slice: create it, install the repo on every worker,
run the command on all of them with --distributed, stream worker 0's log, fetch the results,
delete the slice.

  python tools/tpu_vm.py --name=r1 --zone=us-east5-a --accelerator_type=v5litepod-8 \\
      --setup="gcloud storage cp -r gs://BUCKET/Qwen2.5-1.5B gs://BUCKET/gsm8k ~" \\
      --command="python -m r1jax.main --config=experiments/r1_zero_qwen2p5_1p5b_gsm8k.py \\
      --config.model.hf_dir=$HOME/Qwen2.5-1.5B ... --workdir=runs/r1z" \\
      [--queued] [--spot] [--project=P] [--fetch_to=results] [--keep] [--dry_run]

`--dry_run` prints every gcloud command, in order, and runs none. Without it the launcher
needs `gcloud` (authenticated) and runs them: a failed step stops the run and, unless
`--keep`, still deletes the slice, so a crash never leaves chips billing; a failed run
still has its workdir and logs fetched first.

A slice of several hosts runs one process per host (v4-16 and up, v5e-16 and up, v5p-16 and
up): every worker gets the same command at the same time (`--worker=all`), and
`jax.distributed.initialize()` (`--distributed`, added when missing) finds its peers from
the TPU VM's metadata. The repo goes to the workers as `git archive` of HEAD: what is
committed runs, nothing else. `--setup` runs once on every worker before the command (copy
weights and data there). A relative workdir is under the repo's folder on the worker; it is
copied back from worker 0; a `gs://` one is fetched with `gcloud storage`.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

# Generation -> (TPU VM runtime image, how the type's number counts: "cores" (two a chip) or
# "chips"), the largest single-host slice in chips, and chips per host beyond it.
_GENERATIONS = {
    "v4": ("tpu-ubuntu2204-base", "cores", 4, 4),
    "v5litepod": ("v2-alpha-tpuv5-lite", "chips", 8, 4),
    "v5p": ("v2-alpha-tpuv5", "cores", 4, 4),
    "v6e": ("v2-alpha-tpuv6e", "chips", 8, 4),
}
_TYPE = re.compile(r"(v4|v5litepod|v5p|v6e)-(\d+)\Z")
REMOTE_DIR = "r1jax"  # under each worker's home
LOG = "r1jax_run.log"  # each worker's log, in its home


@dataclasses.dataclass(frozen=True)
class Slice:
  """What the launcher needs to know of an accelerator type."""

  accelerator_type: str
  runtime_version: str
  chips: int
  hosts: int


def slice_of(accelerator_type: str, runtime_version: str = "") -> Slice:
  """Chips and hosts of e.g. "v5litepod-16" (16 chips, 4 hosts) or "v4-32" (16 chips, 4
  hosts), with the generation's runtime image unless `runtime_version` is given."""
  m = _TYPE.match(accelerator_type)
  if m is None:
    raise ValueError(f"accelerator type {accelerator_type!r}: expected one of "
                     f"{sorted(_GENERATIONS)} then '-N', e.g. v5litepod-16, v4-32, v5p-16")
  image, unit, single_host_chips, per_host = _GENERATIONS[m.group(1)]
  n = int(m.group(2))
  chips = n // 2 if unit == "cores" else n
  if unit == "cores" and n % 2:
    raise ValueError(f"accelerator type {accelerator_type!r}: {m.group(1)} counts TensorCores, "
                     "two a chip, so N must be even")
  if chips < 1:
    raise ValueError(f"accelerator type {accelerator_type!r}: no chips")
  hosts = 1 if chips <= single_host_chips else -(-chips // per_host)
  return Slice(accelerator_type, runtime_version or image, chips, hosts)


@dataclasses.dataclass(frozen=True)
class Launch:
  """One run: where, on what, which command."""

  name: str
  zone: str
  slice: Slice
  command: str
  setup: str = ""  # run on every worker after the install, before the command
  project: str = ""
  queued: bool = False
  spot: bool = False
  fetch_to: str = "results"  # local folder the workdir is copied into
  archive: str = str(Path(tempfile.gettempdir()) / "r1jax-src.tar.gz")  # HEAD, sent to all

  @property
  def qr(self) -> str:
    return f"{self.name}-qr"


def with_distributed(command: str) -> str:
  """The command with --distributed after `r1jax.main` when it runs r1jax.main without it
  (the rest of the text as written, so the worker's shell still expands $HOME and such)."""
  argv = shlex.split(command)
  if "r1jax.main" not in argv or any(a.startswith("--distributed") or a == "--nodistributed"
                                     for a in argv):
    return command
  return re.sub(r"(?<!\S)r1jax\.main(?=\s|$)", "r1jax.main --distributed", command, count=1)


def workdir_of(command: str) -> str:
  """The --workdir the command writes (required: that is what comes back)."""
  argv = shlex.split(command)
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  raise ValueError(f"the command names no --workdir, so there is nothing to fetch: {command!r}")


def _gcloud(launch: Launch, *args: str) -> list[str]:
  out = ["gcloud", "compute", "tpus", *args, f"--zone={launch.zone}"]
  return out + ([f"--project={launch.project}"] if launch.project else [])


def _ssh(launch: Launch, worker: str, remote: str) -> list[str]:
  return _gcloud(launch, "tpu-vm", "ssh", launch.name, f"--worker={worker}",
                 f"--command={remote}")


def create_steps(launch: Launch) -> list[list[str]]:
  """The slice, directly or through a queued resource (then waited for until ACTIVE)."""
  s, spot = launch.slice, ["--spot"] if launch.spot else []
  if not launch.queued:
    return [_gcloud(launch, "tpu-vm", "create", launch.name,
                    f"--accelerator-type={s.accelerator_type}", f"--version={s.runtime_version}",
                    *spot)]
  return [_gcloud(launch, "queued-resources", "create", launch.qr, f"--node-id={launch.name}",
                  f"--accelerator-type={s.accelerator_type}",
                  f"--runtime-version={s.runtime_version}", *spot),
          ["WAIT_ACTIVE", *_gcloud(launch, "queued-resources", "describe", launch.qr,
                                   "--format=value(state.state)")]]


def install_steps(launch: Launch) -> list[list[str]]:
  """HEAD as a tarball to every worker, unpacked and pip-installed with the tpu extra."""
  remote = (f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/r1jax-src.tar.gz -C ~/{REMOTE_DIR} && "
            f"cd ~/{REMOTE_DIR} && python3 -m venv ~/r1jax-venv && "
            f"~/r1jax-venv/bin/pip install -q -e '.[tpu,gcs]' && : > ~/{LOG}")
  return [["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={launch.archive}",
           "HEAD"],
          _gcloud(launch, "tpu-vm", "scp", launch.archive, f"{launch.name}:~/r1jax-src.tar.gz",
                  "--worker=all"),
          _ssh(launch, "all", remote)] + (
              [_ssh(launch, "all", f"cd ~/{REMOTE_DIR} && ({launch.setup})")]
              if launch.setup else [])


def run_steps(launch: Launch) -> list[list[str]]:
  """The command on every worker at once (each logs to ~/LOG), and worker 0's log streamed
  beside it until the run ends (the "STREAM" step runs in the background)."""
  command = with_distributed(re.sub(r"\s*\\?\n\s*", " ", launch.command.strip()))  # one line
  remote = (f"cd ~/{REMOTE_DIR} && . ~/r1jax-venv/bin/activate && "
            f"({command}) > ~/{LOG} 2>&1; status=$?; tail -n 5 ~/{LOG}; exit $status")
  return [["STREAM", *_ssh(launch, "0", f"tail -n +1 -F ~/{LOG}")],
          _ssh(launch, "all", remote)]


def fetch_steps(launch: Launch) -> list[list[str]]:
  """The workdir (from GCS, or from worker 0's disk) and every worker's log."""
  workdir = workdir_of(launch.command)
  local = str(Path(launch.fetch_to) / Path(workdir.rstrip("/")).name)
  if workdir.startswith("gs://"):
    get = ["gcloud", "storage", "cp", "--recursive", workdir, launch.fetch_to]
  else:
    remote = workdir if workdir.startswith("/") else f"~/{REMOTE_DIR}/{workdir}"
    get = _gcloud(launch, "tpu-vm", "scp", "--recurse", f"{launch.name}:{remote}", local,
                  "--worker=0")
  logs = [_gcloud(launch, "tpu-vm", "scp", f"{launch.name}:~/{LOG}",
                  str(Path(launch.fetch_to) / f"worker{w}.log"), f"--worker={w}")
          for w in range(launch.slice.hosts)]
  return [["mkdir", "-p", launch.fetch_to], get, *logs]


def delete_steps(launch: Launch) -> list[list[str]]:
  if launch.queued:  # --force deletes the node with its queued resource
    return [_gcloud(launch, "queued-resources", "delete", launch.qr, "--force", "--quiet")]
  return [_gcloud(launch, "tpu-vm", "delete", launch.name, "--quiet")]


def plan(launch: Launch, keep: bool = False) -> list[tuple[str, list[list[str]]]]:
  """Every phase's commands, in order."""
  phases = [("create", create_steps(launch)), ("install", install_steps(launch)),
            ("run", run_steps(launch)), ("fetch", fetch_steps(launch))]
  return phases + ([] if keep else [("delete", delete_steps(launch))])


def render(phases: list[tuple[str, list[list[str]]]]) -> str:
  """The plan as shell lines, one a command, a comment before each phase."""
  lines = []
  for name, steps in phases:
    lines.append(f"# {name}")
    for argv in steps:
      if argv[0] == "WAIT_ACTIVE":
        lines.append(f"until [ \"$({shlex.join(argv[1:])})\" = ACTIVE ]; do sleep 30; done")
      elif argv[0] == "STREAM":
        lines.append(f"{shlex.join(argv[1:])} &  # worker 0's log, until the run ends")
      else:
        lines.append(shlex.join(argv))
  return "\n".join(lines)


def execute(phases, keep: bool, wait_s: float = 30.0, grace_s: float = 5.0) -> int:
  """Runs the plan; on a failure, skips to the delete phase (unless `keep`), fetching first
  when the run itself failed (its logs say why). The exit status of the first failed
  command, else 0. A phase's background stream gets `grace_s` after the phase to print the
  log's last lines, then is stopped."""
  status, failed_in, background = 0, "", []
  for name, steps in phases:
    if status and name != "delete" and not (name == "fetch" and failed_in == "run"):
      continue
    for argv in steps:
      if argv[0] == "WAIT_ACTIVE":
        while (state := subprocess.run(argv[1:], capture_output=True, text=True).stdout
               .strip()) != "ACTIVE":
          if state in ("FAILED", "SUSPENDED"):
            print(f"[tpu_vm] queued resource is {state}", file=sys.stderr)
            status = status or 1
            break
          time.sleep(wait_s)
        continue
      if argv[0] == "STREAM":
        background.append(subprocess.Popen(argv[1:]))
        continue
      code = subprocess.call(argv)
      if code and not status:
        print(f"[tpu_vm] {name} failed ({code}): {shlex.join(argv)}", file=sys.stderr)
        status, failed_in = code, name
        if name != "delete":
          break
    for p in background:
      try:
        p.wait(timeout=grace_s)
      except subprocess.TimeoutExpired:
        p.terminate()
    background = []
  if status and keep:
    print("[tpu_vm] the slice is kept (--keep): delete it yourself", file=sys.stderr)
  return status


_NAME = flags.DEFINE_string("name", None, "TPU VM (node) name.")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-east5-a (v5e), us-central2-b (v4).")
_TYPE_FLAG = flags.DEFINE_string("accelerator_type", None, "e.g. v5litepod-16, v4-32, v5p-16.")
_COMMAND = flags.DEFINE_string("command", None, "What every worker runs, from the repo root.")
_SETUP = flags.DEFINE_string("setup", "", "Run on every worker before the command, e.g. "
                             "copying weights and data from GCS.")
_PROJECT = flags.DEFINE_string("project", "", "GCP project (default: gcloud's).")
_RUNTIME = flags.DEFINE_string("runtime_version", "", "TPU VM image (default: per generation).")
_QUEUED = flags.DEFINE_bool("queued", False, "Request the slice as a queued resource.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; r1jax resumes on re-run).")
_FETCH = flags.DEFINE_string("fetch_to", "results", "Local folder for the workdir and logs.")
_KEEP = flags.DEFINE_bool("keep", False, "Do not delete the slice at the end.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print every gcloud command; run nothing.")
flags.mark_flags_as_required(["name", "zone", "accelerator_type", "command"])


def main(argv):
  del argv
  try:
    s = slice_of(_TYPE_FLAG.value, _RUNTIME.value)
    launch = Launch(_NAME.value, _ZONE.value, s, _COMMAND.value, _SETUP.value, _PROJECT.value,
                    _QUEUED.value, _SPOT.value, _FETCH.value)
    phases = plan(launch, _KEEP.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(f"# {s.accelerator_type}: {s.chips} chips, {s.hosts} host(s), one process each; "
        f"image {s.runtime_version}")
  if _DRY.value:
    print(render(phases))
    return 0
  return execute(phases, _KEEP.value)


if __name__ == "__main__":
  app.run(main)
