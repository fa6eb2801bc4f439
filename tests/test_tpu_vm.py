"""tools/tpu_vm.py, the Cloud TPU VM launcher: its dry run for a v5e-16 and a v4-32 slice, the
hosts of each accelerator type, and a run through fake `gcloud` / `git` that records what it
was asked to do (order, --distributed on every worker, the slice deleted after a failure)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import tpu_vm  # noqa: E402

R1_ZERO = ("python -m r1jax.main --config=experiments/r1_zero_qwen2p5_1p5b_gsm8k.py "
           "--workdir=gs://bucket/r1zero")


def _launcher(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PATH=path or os.environ["PATH"])
  return subprocess.run([sys.executable, str(REPO / "tools" / "tpu_vm.py"), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def _fake_tools(tmp_path: Path, fail_on: str = "") -> tuple[str, Path]:
  """A PATH whose `gcloud` and `git` append their argv (JSON) to calls.jsonl; `gcloud` says a
  queued resource is ACTIVE, and exits 3 when its argv holds `fail_on`."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir(parents=True)
  for tool in ("gcloud", "git"):
    script = bin_dir / tool
    script.write_text(f"""#!{sys.executable}
import json, sys
with open({str(calls)!r}, "a") as f:
  f.write(json.dumps([{tool!r}] + sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
  print("ACTIVE")
if {fail_on!r} and any({fail_on!r} in a for a in sys.argv):
  sys.exit(3)
""")
    script.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", calls


def test_accelerator_types_give_chips_hosts_and_images():
  got = {t: (s.chips, s.hosts, s.runtime_version) for t in
         ("v5litepod-16", "v5litepod-8", "v4-32", "v4-8", "v5p-16", "v6e-64")
         for s in [tpu_vm.slice_of(t)]}
  assert got == {"v5litepod-16": (16, 4, "v2-alpha-tpuv5-lite"),
                 "v5litepod-8": (8, 1, "v2-alpha-tpuv5-lite"),
                 "v4-32": (16, 4, "tpu-ubuntu2204-base"), "v4-8": (4, 1, "tpu-ubuntu2204-base"),
                 "v5p-16": (8, 2, "v2-alpha-tpuv5"), "v6e-64": (64, 16, "v2-alpha-tpuv6e")}
  assert tpu_vm.slice_of("v4-32", "my-image").runtime_version == "my-image"
  for bad in ("v9-8", "v4-7", "v5e-16", "v4-", "v6e-0"):
    with pytest.raises(ValueError, match="accelerator type"):
      tpu_vm.slice_of(bad)


def test_the_command_gets_distributed_once_and_must_name_its_workdir():
  assert tpu_vm.with_distributed(R1_ZERO).split()[:4] == [
      "python", "-m", "r1jax.main", "--distributed"]
  again = tpu_vm.with_distributed(tpu_vm.with_distributed(R1_ZERO))
  assert again.count("--distributed") == 1
  assert tpu_vm.with_distributed("python -m r1jax.main --config.x=$HOME/y") == (
      "python -m r1jax.main --distributed --config.x=$HOME/y")  # the worker's shell expands it
  assert tpu_vm.workdir_of(R1_ZERO) == "gs://bucket/r1zero"
  assert tpu_vm.workdir_of("python -m r1jax.main --workdir /tmp/x") == "/tmp/x"
  with pytest.raises(ValueError, match="no --workdir"):
    tpu_vm.workdir_of("python -m r1jax.main --config=experiments/tiny_zero.py")


@pytest.mark.parametrize("accelerator,queued,workdir", [
    ("v5litepod-16", True, "gs://bucket/r1zero"), ("v4-32", False, "/tmp/tz")])
def test_dry_run_prints_every_gcloud_command_and_runs_none(tmp_path, accelerator, queued,
                                                           workdir):
  path, calls = _fake_tools(tmp_path)
  command = R1_ZERO.replace(" --workdir", " \\\n  --workdir").replace("gs://bucket/r1zero",
                                                                      workdir)
  out = _launcher("--name=r1", "--zone=us-east5-a", f"--accelerator_type={accelerator}",
                  f"--command={command}", "--dry_run", "--setup=gcloud storage cp -r gs://b/m ~",
                  *(["--queued"] if queued else []), path=path)
  assert out.returncode == 0, out.stderr
  assert not calls.exists()  # nothing ran
  lines = [l for l in out.stdout.splitlines() if not l.startswith("#")]
  phases = [l[2:] for l in out.stdout.splitlines() if l.startswith("# ") and ":" not in l]
  assert phases == ["create", "install", "run", "fetch", "delete"]
  create = lines[0]
  assert f"--accelerator-type={accelerator}" in create and "--zone=us-east5-a" in create
  assert ("queued-resources create r1-qr --node-id=r1" in create) == queued
  assert any("ACTIVE" in l for l in lines) == queued
  setup = [i for i, l in enumerate(lines) if "gs://b/m" in l]
  install = [i for i, l in enumerate(lines) if "pip install" in l]
  assert len(setup) == 1 and "--worker=all" in lines[setup[0]] and setup[0] == install[0] + 1
  run_all = [l for l in lines if "--worker=all" in l and "r1jax.main" in l]
  assert len(run_all) == 1 and run_all[0].count("--distributed") == 1
  assert "--config=experiments/r1_zero_qwen2p5_1p5b_gsm8k.py --workdir=" in run_all[0]
  assert any("--worker=0" in l and "tail" in l and l.endswith("&  # worker 0's log, until "
                                                             "the run ends") for l in lines)
  fetch = [l for l in lines if l.startswith("gcloud storage cp") or "--recurse" in l]
  assert len(fetch) == 1 and workdir in fetch[0]
  assert sum("r1jax_run.log' results/worker" in l for l in lines) == 4  # 4 hosts each
  assert "delete" in lines[-1]
  for l in lines:  # every line is a command a shell can read
    shlex.split(l, comments=True)


def test_a_run_goes_through_every_phase_and_a_failure_still_deletes_the_slice(tmp_path):
  path, calls = _fake_tools(tmp_path)
  args = ("--name=r1", "--zone=us-east5-a", "--accelerator_type=v5litepod-16", "--queued",
          f"--command={R1_ZERO}", f"--fetch_to={tmp_path / 'out'}")
  assert _launcher(*args, path=path).returncode == 0
  got = [json.loads(l) for l in calls.read_text().splitlines()]
  kinds = [c[0] if c[0] == "git" else " ".join(c[1:3] if c[1] == "storage" else c[3:5])
           for c in got]
  assert kinds == ["queued-resources create", "queued-resources describe", "git",
                   "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "storage cp"] + [
                       "tpu-vm scp"] * 4 + ["queued-resources delete"], kinds
  assert sum("--distributed" in " ".join(c) for c in got) == 1

  failing = tmp_path / "again"
  failing.mkdir()
  path, calls = _fake_tools(failing, fail_on="pip install")
  out = _launcher(*args, path=path)
  assert out.returncode == 3 and "install failed (3)" in out.stderr
  got = [" ".join(json.loads(l)) for l in calls.read_text().splitlines()]
  assert not any("r1jax.main" in c or "storage cp" in c for c in got)  # no run, no fetch
  assert "queued-resources delete r1-qr" in got[-1]
  broken = tmp_path / "broken"
  broken.mkdir()
  path, calls = _fake_tools(broken, fail_on="r1jax.main")  # the run fails: logs still come
  out = _launcher(*args, path=path)
  got = [" ".join(json.loads(l)) for l in calls.read_text().splitlines()]
  assert out.returncode == 3 and "run failed (3)" in out.stderr
  assert sum("r1jax_run.log" in c and "scp" in c for c in got) == 4 and "storage cp" in got[-6]
  assert "queued-resources delete r1-qr" in got[-1]
  path, calls = _fake_tools(failing / "k", fail_on="pip install")
  out = _launcher(*args, "--keep", path=path)
  assert out.returncode == 3 and "--keep" in out.stderr
  assert not any("delete" in l for l in calls.read_text().splitlines())
