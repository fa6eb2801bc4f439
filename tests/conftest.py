"""Test setup: 8 fake CPU devices (so every test can shard), one compilation cache, fixtures.

The persistent JAX compilation cache lives for one test session and is shared with every
process the session starts (pytest-xdist workers, `python -m r1jax.main` runs): a resume test
then loads the programs its uninterrupted run compiled instead of compiling them again.
"""

import os
import shutil
import tempfile

# Compile for test speed: LLVM's backend optimisations are most of XLA:CPU's compile time,
# and the tests' programs run for milliseconds (measured: test_model + test_train_step
# 215 s -> 159 s). XLA's own HLO passes (fusion, layout, algebraic simplification) still run.
# The MLIR fusion emitters compile fusions about twice as slowly as the older elemental
# emitters (measured: test_r1_real's compile 33.5 s -> 16.9 s without them).
COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "").split()  # xdist workers inherit the parent's
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in COMPILE_FLAGS.split() + [
    "--xla_force_host_platform_device_count=8"] if f not in _flags])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The session's cache: made by the process pytest was started in; its xdist workers and the
# subprocesses of every test inherit it through the environment (jax reads JAX_* at import).
_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="r1jax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import collections  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# R1JAX_TEST_COMPILE_PROFILE=DIR: each test process writes DIR/<worker>.json, the seconds each
# test (its fixtures' setup included) spent tracing, lowering and compiling in that process
# (the subprocesses a test starts are not counted). WORKSPACE.md, "Tests", has the command.
_PROFILE_DIR = os.environ.get("R1JAX_TEST_COMPILE_PROFILE")
_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                   "/jax/core/compile/backend_compile_duration": "compile"}
_compile_s: dict = collections.defaultdict(collections.Counter)
_current_test = ["(collection)"]


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_s[_current_test[0]][_COMPILE_EVENTS[event]] += seconds


def pytest_runtest_logstart(nodeid, location):
  del location
  _current_test[0] = nodeid


def pytest_sessionfinish(session):
  del session
  if _PROFILE_DIR:
    out = Path(_PROFILE_DIR) / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: dict(v) for k, v in _compile_s.items()}, indent=1))


# The slowest files, slowest first (seconds in two workers, benchmarks/test_suite.md): xdist
# hands out whole files in collection order, so these start first and the many quick files
# fill the gaps at the end. Without the order a 100-second file could start last.
HEAVY_FIRST = ("test_r1_pipeline", "test_rewards_model", "test_rl", "test_train_step",
               "test_pipeline", "test_r1_real",
               "test_sampler", "test_model", "test_packing", "test_rl_overlap",
               "test_generate", "test_multihost", "test_sft", "test_losses", "test_evaluate",
               "test_aot",
               "test_kernels")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # xdist: keep HEAVY_FIRST's order, not the
    config.option.loadscopereorder = False        # default largest-test-count-first
  if _PROFILE_DIR:
    import jax  # pylint: disable=import-outside-toplevel  (after the environment above)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
  config.addinivalue_line(
      "markers", "slow: over ~3 s each, or reads a fixture that runs a whole stage; the "
      "quick tier, pytest -m 'not slow', skips them and still runs every test module")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The read-only benchmark data beside the repository (CI always has it)."""
  if not SHARED_DATA.is_dir():
    pytest.skip("shared benchmark data not found at ../shared/data relative to the repo")
  return SHARED_DATA
