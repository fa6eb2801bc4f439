"""Params checkpoints (orbax) and tools/convert_checkpoint.py: HF -> r1jax -> HF round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from hf_models import QWEN, make_hf_model
from r1jax import checkpoint, hf, model, sharding

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  make_hf_model(QWEN).save_pretrained(path)
  return path


def _tool(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  return out


def test_convert_tool_round_trip(hf_dir, tmp_path):
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


def test_wrong_shape_checkpoint_is_rejected(hf_dir, tmp_path):
  cfg, params = hf.load_pretrained(hf_dir)
  checkpoint.save_params(tmp_path / "c", params, cfg)
  meta = json.loads((tmp_path / "c" / "model.json").read_text())
  meta["mlp_dim"] = 128
  (tmp_path / "c" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"layers/up: stored \(2, 64, 96\), config implies \(2, 64, 128\)"):
    checkpoint.load_params(tmp_path / "c")
  with pytest.raises(FileNotFoundError, match="not an r1jax params checkpoint"):
    checkpoint.load_params(tmp_path / "nothing")


def test_convert_tool_usage_errors(tmp_path):
  out = _tool(f"--out={tmp_path}")
  assert out.returncode != 0 and "exactly one source" in out.stderr
