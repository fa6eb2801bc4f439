"""Configs and the entry point: experiments load and lock, presets, CLI overrides, smoke stage."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest

from r1jax.core import model
from r1jax.core import sharding
from r1jax.core.config import (config_from_file, model_config, model_group,
                               non_finite_fields, parse_arg)
from r1jax.core.errors import ConfigError
from r1jax import stages
from r1jax.stages import pipeline

import main_runs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))


def load_experiment(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiments_load_locked_and_commented(path):
  c = load_experiment(path)
  assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
  with pytest.raises(AttributeError):
    c.no_such_field = 1
  # The model group (each stage's, in a pipeline) always forms a valid ModelConfig.
  groups = [c.model] if "model" in c else [v.model for v in c.values()
                                           if isinstance(v, ml_collections.ConfigDict)
                                           and "model" in v]
  assert groups
  for group in groups:
    model_config(group)
  # A pipeline's every stage config validates as its stage would, before any run.
  for name in c.get("order") or ():
    if c[name].stage != "pipeline":
      stages.validate(pipeline.resolve(c[name], Path("/nonexistent-workdir")))
  # Every field assignment in the file carries an inline comment.
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if re.match(r"\s+c(\.\w+)+ = ", line) and "ConfigDict()" not in line:
      assert "#" in line, f"{path.name}:{n} has no comment: {line.strip()}"


# Published parameter counts of the released checkpoints.
@pytest.mark.parametrize("name,count", [("qwen2.5-0.5b", 494_032_768),
                                        ("qwen2.5-1.5b", 1_543_714_304),
                                        ("qwen2.5-7b", 7_615_616_512),
                                        ("llama3.1-8b", 8_030_261_248)])
def test_presets_param_counts_and_sharding(name, count):
  cfg = model_config(model_group(name))
  assert cfg.num_params == count
  # Abstract init + shardings at full size (nothing allocated): FSDP over 8.
  abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  mesh = sharding.make_mesh((1, 8, 1))
  shards = sharding.tree_shardings(model.param_axes(cfg), abstract, mesh)
  per_device = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                   for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shards)))
  fraction = per_device / sharding.tree_bytes(abstract)
  # Only norms and biases stay replicated under FSDP: < 0.2% of the bytes.
  assert 1 / 8 <= fraction < 1 / 8 * 1.002


def test_parse_arg_and_model_group_errors():
  a = parse_arg("size=30m,runlocal", size="tiny", runlocal=False, steps=10)
  assert (a.size, a.runlocal, a.steps) == ("30m", True, 10)
  assert parse_arg("steps=7", steps=10).steps == 7
  with pytest.raises(ValueError, match="unknown config arg 'sise'"):
    parse_arg("sise=30m", size="tiny")
  with pytest.raises(ValueError, match="unknown model preset"):
    model_group("qwen9")
  with pytest.raises(ValueError, match="unknown model field 'hiden'"):
    model_group(hiden=3)
  with pytest.raises(ValueError, match="must be a multiple"):
    model_config(model_group(heads=6, kv_heads=4))


def test_a_non_finite_setting_is_refused_before_anything_is_written(tmp_path):
  """NaN or inf in any numeric field, nested groups and lists included, stops a run at once
  and names the field: a NaN learning rate passes every range check and trains nothing."""
  from r1jax import stages
  from r1jax.stages.rl import rl_config
  c = rl_config(steps=2)
  c.opt.lr = float("nan")
  c.rewards.components[1]["weight"] = float("-inf")
  with pytest.raises(ValueError, match="must be finite numbers") as err:
    stages.run(c, str(tmp_path / "run"))
  assert "opt.lr" in str(err.value) and "rewards.components[1].weight" in str(err.value)
  assert not (tmp_path / "run").exists()
  c.opt.lr, c.rewards.components[1]["weight"] = 1e-6, 1.0
  assert non_finite_fields(c) == []
  out = _main("--config=experiments/tiny.py", f"--workdir={tmp_path / 'cli'}",
              "--config.model.rope_theta=nan")  # through main: its own exit status
  assert out.returncode == ConfigError.exit_code, out.stderr[-3000:]
  assert "ConfigError" in out.stderr and "model.rope_theta must be finite" in out.stderr
  assert not (tmp_path / "cli").exists()


def _main(*args, devices=8):
  return subprocess.run([sys.executable, "-m", "r1jax.main", *args], cwd=REPO,
                        env=main_runs.env(devices),
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_main_smoke_on_a_mesh(tmp_path):
  out = _main("--config=experiments/tiny.py", f"--workdir={tmp_path}",
              "--config.mesh.shape=(1,4,2)", "--config.smoke.seq_len=16")
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["logits_finite"] and report["logits_shape"] == [8, 16, 1024]
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert report["max_param_bytes_per_device"] < report["param_bytes"] / 7
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["smoke"]["seq_len"] == 16


@pytest.mark.slow
def test_main_cpu_devices_flag_sets_the_mesh(tmp_path):
  """--cpu_devices wins over the environment's fake-device count (one device per core)."""
  out = _main("--config=experiments/tiny.py", f"--workdir={tmp_path}", "--cpu_devices=2",
              "--config.smoke.seq_len=16")
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 2 and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}


def test_main_rejects_override_typo(tmp_path):
  """A typo in an override: one plain line naming the field and its near spelling, no
  traceback, before any work; on a pipeline, the stage groups that hold the field."""
  out = _main("--config=experiments/tiny.py", f"--workdir={tmp_path}", "--config.model.hiden=3")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [
      "--config.model.hiden: experiments/tiny.py has no field 'model.hiden'; did you mean "
      "--config.model.hidden?"]
  assert not (tmp_path / "config.json").exists()  # failed before doing any work
  out = _main("--config=experiments/tiny_zero.py:quick", f"--workdir={tmp_path}",
              "--config.model.hiden=3")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [
      "--config.model.hiden: experiments/tiny_zero.py has no field 'model.hiden'; did you mean "
      "--config.base.model.hidden or --config.rl.model.hidden?"]
  assert not (tmp_path / "config.json").exists()


def test_override_problems_name_the_field_and_where_it_could_be():
  """Each kind of override mistake, on a pipeline's config: one or two plain lines."""
  from r1jax.main import override_problem
  c = config_from_file(str(REPO / "experiments" / "tiny_zero.py"), "quick")
  say = lambda field: override_problem(c, field, "tz.py")
  assert say("rl.model.hidden") is None and say("rl.grpo.beta") is None
  assert say("rl.model.hiden") == ("--config.rl.model.hiden: tz.py has no field "
                                   "'rl.model.hiden'; did you mean --config.rl.model.hidden?")
  assert say("rl.gpro.beta").endswith("did you mean --config.rl.grpo.beta?")
  assert say("grpo.beta").endswith("; it lives at --config.rl.grpo.beta")
  assert say("rl.grpo.beta.x").endswith("; --config.rl.grpo.beta is a value, not a group")
  assert say("foo.bar").splitlines() == [
      "--config.foo.bar: tz.py has no field 'foo.bar'",
      "the top level holds: " + ", ".join(sorted(c.keys()))]
  lines = say("rl.zzz").splitlines()
  assert len(lines) == 2 and lines[1].startswith("--config.rl holds: ckpt, data, ")


@pytest.mark.slow
def test_main_rejects_bad_mesh(tmp_path):
  out = _main("--config=experiments/tiny.py", f"--workdir={tmp_path}",
              "--config.mesh.shape=(3,1,1)")
  assert out.returncode != 0 and "needs 3 devices, but 8 are available" in out.stderr


@pytest.mark.slow
def test_main_names_a_missing_config_file_and_a_field_under_the_wrong_group(tmp_path):
  missing = _main("--config=experiments/nope.py", f"--workdir={tmp_path}")
  assert missing.returncode != 0
  assert missing.stderr.strip().splitlines()[0] == "no such config file: experiments/nope.py"
  wrong = _main("--config=experiments/tiny_zero.py:quick", f"--workdir={tmp_path}",
                "--config.grpo.beta=0.1")
  assert wrong.returncode != 0
  assert ("--config.grpo.beta: experiments/tiny_zero.py has no field 'grpo.beta'; it lives at "
          "--config.rl.grpo.beta") in wrong.stderr
  assert not (tmp_path / "config.json").exists()  # refused before any work


@pytest.mark.slow
def test_main_uses_one_cpu_device_per_core_by_default(tmp_path):
  """No flag and no fake device count in XLA_FLAGS: the mesh spans one device per core."""
  out = subprocess.run([sys.executable, "-m", "r1jax.main", "--config=experiments/tiny.py",
                        f"--workdir={tmp_path}", "--config.smoke.seq_len=16"], cwd=REPO,
                       env=main_runs.env(devices=None), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == len(os.sched_getaffinity(0))
  assert sharding.cpu_devices_to_request(-1, "--xla_force_host_platform_device_count=8") == 0
  assert sharding.cpu_devices_to_request(3, "--xla_force_host_platform_device_count=8") == 3
  assert sharding.cpu_devices_to_request(0, "") == 0
  assert sharding.cpu_devices_to_request(-1, "", env_count="4") == 0  # JAX reads it itself


def test_an_accelerator_host_gets_no_cpu_mesh_by_default(monkeypatch):
  """libtpu installed: a host with a TPU's device files keeps JAX's one CPU device; one
  without them (libtpu there for AOT compiles) is a CPU host, one device per core."""
  import importlib.util as iu
  real = iu.find_spec
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(iu, "find_spec", lambda name, *a: object() if name == "libtpu"
                      else real(name, *a))
  monkeypatch.setattr(sharding.glob, "glob", lambda pattern: [])
  assert sharding.cpu_devices_to_request(-1, "") == len(os.sched_getaffinity(0))
  monkeypatch.setattr(sharding.glob, "glob",
                      lambda pattern: ["/dev/vfio/0"] if pattern.startswith("/dev/vfio") else [])
  assert sharding.cpu_devices_to_request(-1, "") == 0
  assert sharding.cpu_devices_to_request(2, "") == 2  # an explicit count is still honoured
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # forced CPU: one device per core again
  assert sharding.cpu_devices_to_request(-1, "") == len(os.sched_getaffinity(0))


def test_one_run_per_workdir_a_second_is_refused_at_once_naming_the_holder(tmp_path, caplog):
  """The workdir lock: a second run on a held workdir exits 73 before writing anything, and
  says who holds it; a lock left by a run killed -9 is taken over, with a warning."""
  from r1jax.core.errors import WorkdirLock, WorkdirLocked
  held = tmp_path / "held"
  held.mkdir()
  (held / "config.json").write_text("the running run's")
  with WorkdirLock(held):
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
      WorkdirLock(held).__enter__()  # a second opener, even in this process
    out = _main("--config=experiments/tiny.py", f"--workdir={held}")
  assert out.returncode == WorkdirLocked.exit_code, out.stderr[-3000:]
  assert f"{held} is in use by another run (host " in out.stderr
  assert (held / "config.json").read_text() == "the running run's"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from r1jax.core.errors import WorkdirLock; "
       "WorkdirLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)",
       str(held)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}"):
    WorkdirLock(held).__enter__()
  holder.kill()
  holder.wait()
  with caplog.at_level("WARNING"), WorkdirLock(held):
    pass
  assert "taking over the lock of a run that is gone (host" in caplog.text
  assert f"pid {holder.pid}" in caplog.text
