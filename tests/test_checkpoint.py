"""Params checkpoints (orbax) and tools/convert_checkpoint.py: HF -> r1jax -> HF round trip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import main_runs
from hf_models import QWEN, make_hf_model
from r1jax.core import checkpoint
from r1jax.core.errors import NonFiniteError
from r1jax.core import hf
from r1jax.core import model
from r1jax.core import sharding
from r1jax.core import weights
from r1jax.core.config import model_group

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  make_hf_model(QWEN).save_pretrained(path)
  return path


def _tool(*args):
  out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *args], cwd=REPO,
                       env=main_runs.env(), capture_output=True, text=True, timeout=300)
  return out


@pytest.mark.slow
def test_convert_tool_round_trip(hf_dir, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  out = _tool(f"--hf_dir={hf_dir}", f"--out={tmp_path / 'ckpt'}")
  assert out.returncode == 0, out.stderr[-3000:]
  out = _tool(f"--ckpt={tmp_path / 'ckpt'}", f"--out_hf={tmp_path / 'back'}")
  assert out.returncode == 0, out.stderr[-3000:]
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
  assert set(ref) == set(back)
  assert all(torch.equal(ref[k], back[k]) for k in ref)


def test_restore_into_mesh_and_dtype(hf_dir, tmp_path):
  cfg, params = hf.load_pretrained(hf_dir)
  checkpoint.save_params(tmp_path / "c", params, cfg)
  mesh = sharding.make_mesh((2, 2, 2))
  cfg2, restored = checkpoint.load_params(tmp_path / "c", mesh=mesh)
  assert cfg2 == cfg
  for name, (shape, axes, _) in model.param_table(cfg).items():
    leaf = model.flatten(restored)[name]
    assert leaf.sharding.spec == sharding.logical_to_spec(axes, shape, mesh)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(model.flatten(params)[name]))
  _, bf16 = checkpoint.load_params(tmp_path / "c", param_dtype="bfloat16")
  assert {a.dtype for a in jax.tree.leaves(bf16)} == {jax.numpy.dtype("bfloat16")}


def test_the_config_numerics_and_kernel_apply_to_loaded_weights(hf_dir, tmp_path):
  """A stage's `model` group decides dtypes, remat, the attention kernel and its query
  blocks, whatever the checkpoint or HF folder it loads from recorded."""
  cfg, params = hf.load_pretrained(hf_dir)
  checkpoint.save_params(tmp_path / "c", params, cfg)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  for source in ({"init_from": str(tmp_path / "c")}, {"hf_dir": str(hf_dir)}):
    group = ml_collections.ConfigDict({
        **model_group(**{f: getattr(cfg, f) for f in weights._SHAPE_FIELDS}).to_dict(),
        "compute_dtype": "bfloat16", "remat": "full", "attention": "xla",
        "attention_block": 64, **source})
    got, _ = weights.load_model(group, mesh, abstract=True)
    assert (got.compute_dtype, got.remat, got.attention, got.attention_block) == (
        "bfloat16", "full", "xla", 64), source


def test_wrong_shape_checkpoint_is_rejected(hf_dir, tmp_path):
  cfg, params = hf.load_pretrained(hf_dir)
  checkpoint.save_params(tmp_path / "c", params, cfg)
  meta = json.loads((tmp_path / "c" / "model.json").read_text())
  meta["mlp_dim"] = 128
  (tmp_path / "c" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"does not match model.json: .*\['layers'\]\['up'\]: "
                     r"stored \(2, 64, 96\), run has \(2, 64, 128\)"):
    checkpoint.load_params(tmp_path / "c")
  with pytest.raises(FileNotFoundError, match="not an r1jax params checkpoint"):
    checkpoint.load_params(tmp_path / "nothing")


def test_convert_tool_usage_errors(tmp_path):
  out = _tool(f"--out={tmp_path}")
  assert out.returncode != 0 and "exactly one source" in out.stderr


# ------------------------------------------------------------------------ train checkpoints


def _state(value: float):
  return {"w": jax.numpy.full((4, 3), value, jax.numpy.float32),
          "step": jax.numpy.zeros((), jax.numpy.int32)}


def test_train_checkpointer_round_trip_keep_n_and_nan_refusal(tmp_path):
  ck = checkpoint.TrainCheckpointer(tmp_path / "ck", keep=2)
  for step in (1, 2, 3):
    assert ck.save(step, _state(float(step)), {"data": {"consumed": step * 8}})
  with pytest.raises(NonFiniteError, match="step 4: the train state holds NaN/inf"):
    ck.save(4, _state(float("nan")), {"data": {"consumed": 32}})  # refused, nothing written
  ck.wait()
  assert ck.latest_step() == 3
  assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == [2, 3]
  step, state, extra = ck.restore(_state(0.0))
  assert step == 3 and extra == {"data": {"consumed": 24}}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0))
  read = ck.manager.restore
  ck.manager.restore = None  # a mismatch is found from the stored metadata, before any read
  with pytest.raises(ValueError,
                     match=r"does not match.*\['w'\]: stored \(4, 3\), run has \(5, 3\)"):
    ck.restore({"w": jax.numpy.zeros((5, 3)), "step": jax.numpy.zeros((), jax.numpy.int32)})
  with pytest.raises(ValueError, match=r"does not match.*missing \['ref'\]"):  # e.g. a reference
    ck.restore({**_state(0.0), "ref": jax.numpy.zeros(3)})
  ck.manager.restore = read
  assert ck.latest_step() == 3  # a config mismatch is the run's, not the files': nothing moved
  assert not (tmp_path / checkpoint.SET_ASIDE).exists()
  ck.close()
  assert checkpoint.TrainCheckpointer(tmp_path / "empty").restore(_state(0.0)) is None


def test_best_checkpoint_is_kept_by_metric(tmp_path):
  ck = checkpoint.TrainCheckpointer(tmp_path / "ck", keep=1, best_metric="acc", async_save=False)
  for step, acc in ((1, 0.9), (2, 0.1), (3, 0.2)):
    ck.save(step, _state(float(step)), {}, metrics={"acc": acc})
  ck.close()
  assert [int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()] == [1]


def test_preemption_turns_sigterm_into_a_flag():
  import signal
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.Preemption() as p:
    assert not p.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested
  assert signal.getsignal(signal.SIGTERM) == before


def _largest_array_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
             key=lambda p: p.stat().st_size)


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {
    "truncated array file": lambda d: _truncate(_largest_array_file(d)),
    "deleted array file": lambda d: _largest_array_file(d).unlink(),
    "truncated state metadata": lambda d: _truncate(d / "state" / "_METADATA"),
    "deleted extra metadata": lambda d: (d / "extra" / "metadata").unlink(),
    "empty step folder": lambda d: (shutil.rmtree(d), d.mkdir()),
    # valid JSON of the wrong shape: orbax's manager raises on it while it is being made
    "checkpoint metadata a list": lambda d: (d / "_CHECKPOINT_METADATA").write_text("[]"),
    "file list a list": lambda d: (d / checkpoint.FILE_LIST).write_text("[]"),
}
REASONS = {"truncated array file": "bytes; the save wrote", "deleted array file": "is missing",
           "truncated state metadata": "does not parse", "deleted extra metadata": "is missing",
           "empty step folder": "empty step folder",
           "checkpoint metadata a list": "_CHECKPOINT_METADATA holds a JSON list, not an object",
           "file list a list": f"{checkpoint.FILE_LIST} holds a JSON list, not an object"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_step_is_set_aside_and_the_previous_restores(tmp_path, damage):
  ck = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", keep=3)
  for step in (1, 2):
    ck.save(step, _state(float(step)), {"data": {"consumed": step}})
  ck.close()
  assert (tmp_path / "checkpoints" / "2" / checkpoint.FILE_LIST).is_file()
  DAMAGE[damage](tmp_path / "checkpoints" / "2")
  ck = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", keep=3)
  step, state, extra = ck.restore(_state(0.0))
  assert step == 1 and extra == {"data": {"consumed": 1}}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 1.0))
  aside = tmp_path / checkpoint.SET_ASIDE
  assert (aside / "2").is_dir()  # moved, never deleted
  assert REASONS[damage] in (aside / "2.reason.txt").read_text()
  assert ck.manager.all_steps() == [1]
  ck.save(2, _state(5.0), {"data": {"consumed": 2}})  # the step number can be written again
  ck.close()


def test_no_restorable_step_fails_listing_each_reason(tmp_path):
  ck = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", keep=3)
  for step in (1, 2):
    ck.save(step, _state(float(step)), {})
  ck.close()
  _truncate(tmp_path / "checkpoints" / "2" / "state" / "_METADATA")
  (tmp_path / "checkpoints" / "1" / "extra" / "metadata").unlink()
  with pytest.raises(RuntimeError, match=r"step 2: state/_METADATA does not parse.*; "
                                         r"step 1: extra/metadata is missing"):
    checkpoint.TrainCheckpointer(tmp_path / "checkpoints").restore(_state(0.0))
  assert sorted(p.name for p in (tmp_path / checkpoint.SET_ASIDE).iterdir()) == [
      "1", "1.reason.txt", "2", "2.reason.txt"]
