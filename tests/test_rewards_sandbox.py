"""Sandbox tests: normal runs, bad input, and the attack suite in namespace and rlimit modes."""

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from r1jax.rewards import sandbox

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sandbox_check", REPO / "tools" / "sandbox_check.py")
attacks = importlib.util.module_from_spec(_spec)  # the self-check users run: tools/, not a package
_spec.loader.exec_module(attacks)
NS = sandbox.namespaces_available()
needs_ns = pytest.mark.skipif(not NS, reason="namespace mode needs root and util-linux unshare")


def _sandbox_dirs() -> set:
  return set(Path(tempfile.gettempdir()).glob("r1jax-sandbox-*"))


@pytest.fixture
def own_tempdir(monkeypatch):
  """A temporary root for this test alone: the suite's other worker process runs sandboxes
  at the same time, and their folders in the shared /tmp must not count as this test's."""
  root = tempfile.mkdtemp(prefix="r1jax-test-tmp-")
  os.chmod(root, 0o755)  # as /tmp: the sandbox's unprivileged uid reaches its own folder
  monkeypatch.setattr(tempfile, "tempdir", root)
  yield Path(root)
  shutil.rmtree(root, ignore_errors=True)


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="unknown sandbox mode"):
    sandbox.run_python("print(1)", mode="docker")
  with pytest.raises(ValueError, match="positive"):
    sandbox.Limits(timeout_s=0)
  with pytest.raises(ValueError, match="relative"):
    sandbox.run([sys.executable], {"../x.py": ""})
  with pytest.raises(ValueError, match="absolute"):
    sandbox.run(["python3"], {})


@pytest.mark.parametrize("mode", ["namespace", "rlimit"])
def test_runs_program_with_stdin_and_cleans_up(mode, own_tempdir):
  if mode == "namespace" and not NS:
    pytest.skip("namespace mode needs root and util-linux unshare")
  assert Path(tempfile.gettempdir()) == own_tempdir
  before = _sandbox_dirs()
  result = sandbox.run_python(
      "import os\nprint(input()[::-1], os.getcwd() == os.environ['HOME'])", stdin="abc\n",
      mode=mode)
  assert result.ok and result.stdout == "cba True\n" and result.mode == mode, result
  failing = sandbox.run_python("import sys\nprint('x', file=sys.stderr)\nraise SystemExit(3)",
                               mode=mode)
  assert failing.status == "error" and failing.returncode == 3 and "x" in failing.stderr
  assert _sandbox_dirs() == before  # Each run's directory is removed.


def _assert_contained(report: dict) -> None:
  assert set(report) == set(attacks._SOURCES)  # pylint: disable=protected-access
  assert not attacks.failures(report), {k: v for k, v in report.items() if not v["contained"]}


@pytest.mark.slow
@needs_ns
def test_attack_suite_namespace_mode():
  report = attacks.run_suite("namespace")
  _assert_contained(report)
  assert all(r["required"] for r in report.values())  # Namespaces promise everything.


@pytest.mark.slow
def test_attack_suite_rlimit_mode():
  """The non-root fallback. As root we first drop to an unprivileged uid, as on a TPU VM."""
  if os.geteuid() != 0:  # Already unprivileged: this process is the trainer.
    _assert_contained(attacks.run_suite("rlimit"))
    return
  # Copy the stdlib-only modules it needs where an unprivileged uid can read them.
  root = Path(tempfile.mkdtemp(prefix="r1jax-test-"))
  try:
    pkg = root / "r1jax" / "rewards"
    pkg.mkdir(parents=True)
    (root / "r1jax" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    for name in ("sandbox.py", "jail.py"):
      shutil.copy(REPO / "r1jax" / "rewards" / name, pkg / name)
    shutil.copy(REPO / "tools" / "sandbox_check.py", root / "sandbox_check.py")
    for p in [root, *root.rglob("*")]:
      p.chmod(0o755)
    uid = 3_000_000 + secrets.randbelow(1_000_000)  # A fresh uid: no other tasks count.
    child = subprocess.run(
        [sandbox.sandbox_python(), "sandbox_check.py", "--mode", "rlimit", "--json"],
        user=uid, group=uid, extra_groups=[], cwd=root, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root)},
        timeout=120, check=False)
  finally:
    shutil.rmtree(root)
  report = json.loads(child.stdout.strip().splitlines()[-1])
  _assert_contained(report)
  assert {n for n, r in report.items() if not r["required"]} == set(attacks.NAMESPACE_ONLY)
