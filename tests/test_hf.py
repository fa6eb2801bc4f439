"""HF checkpoint import/export: logits parity with transformers, sharded loading, bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import LLAMA, QWEN, make_hf_model
from r1jax.core import hf
from r1jax.core import model
from r1jax.core import sharding

@pytest.fixture(scope="module", params=["qwen", "llama"])
def checkpoint(request, tmp_path_factory):
  m = make_hf_model(QWEN if request.param == "qwen" else LLAMA)
  path = tmp_path_factory.mktemp(request.param)
  m.save_pretrained(path)
  return request.param, m, path


def left_padded_batch(vocab, lengths=(11, 7, 3, 1), t=11, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (len(lengths), t))
  mask = np.zeros((len(lengths), t), bool)
  for i, n in enumerate(lengths):
    mask[i, t - n:] = True
  return np.where(mask, tokens, 0).astype(np.int32), mask


def hf_logits(m, tokens, mask):
  import torch  # pylint: disable=import-outside-toplevel
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = m(input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


@pytest.mark.slow
def test_logits_parity_left_padded(checkpoint):
  _, m, path = checkpoint
  cfg, params = hf.load_pretrained(path)
  tokens, mask = left_padded_batch(cfg.vocab_size)
  ours = np.asarray(model.forward(params, tokens, cfg, mask_BxT=mask))
  ref = hf_logits(m, tokens, mask)
  assert np.abs(ours - ref)[mask].max() <= 1e-4
  # Padding must not change the real tokens' logits: compare each row unpadded.
  for i in range(len(tokens)):
    row = tokens[i][mask[i]][None]
    alone = np.asarray(model.forward(params, row, cfg))[0]
    assert np.abs(alone - ours[i][mask[i]]).max() <= 1e-4


def test_save_reload_identical(checkpoint, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  _, m, path = checkpoint
  cfg, params = hf.load_pretrained(path)
  out = hf.save_pretrained(cfg, params, tmp_path / "export")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(m)
  ref_state, new_state = m.state_dict(), reloaded.state_dict()
  assert set(ref_state) == set(new_state)
  for name in ref_state:
    assert torch.equal(ref_state[name], new_state[name]), name
  tokens, mask = left_padded_batch(cfg.vocab_size, seed=1)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(m, tokens, mask))


def test_multi_shard_with_index(checkpoint, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  name, m, _ = checkpoint
  m.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  cfg, params = hf.load_pretrained(tmp_path / "hf")
  tokens, mask = left_padded_batch(cfg.vocab_size, seed=2)
  ours = np.asarray(model.forward(params, tokens, cfg, mask_BxT=mask))
  assert np.abs(ours - hf_logits(m, tokens, mask))[mask].max() <= 1e-4
  # Our own export, sharded with an index, reloads in transformers too.
  out = hf.save_pretrained(cfg, params, tmp_path / "ours", max_shard_bytes=40_000)
  files = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
  assert len(set(files.values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(m, tokens, mask))


@pytest.mark.slow
def test_load_into_mesh_sharding(checkpoint):
  _, m, path = checkpoint
  mesh = sharding.make_mesh((2, 2, 2))
  cfg, params = hf.load_pretrained(path, mesh=mesh)
  # Every param lands in the sharding its logical axes ask for.
  for name, (shape, axes, _) in model.param_table(cfg).items():
    leaf = model.flatten(params)[name]
    assert leaf.sharding.spec == sharding.logical_to_spec(axes, shape, mesh), name
  tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(11, 5), seed=3)
  ours = np.asarray(model.forward(params, tokens, cfg, mask_BxT=mask))
  assert np.abs(ours - hf_logits(m, tokens, mask))[mask].max() <= 1e-4


@pytest.mark.slow
def test_bf16_load_and_save_round_trip(checkpoint, tmp_path):
  _, _, path = checkpoint
  cfg, params = hf.load_pretrained(path, param_dtype="bfloat16", compute_dtype="bfloat16")
  assert all(a.dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(params))
  out = hf.save_pretrained(cfg, params, tmp_path / "bf16")
  cfg2, params2 = hf.load_pretrained(out, param_dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------- bad input


@pytest.fixture()
def qwen_dir(tmp_path):
  m = make_hf_model(QWEN)
  m.save_pretrained(tmp_path / "q")
  return tmp_path / "q"


def test_missing_config_json(qwen_dir):
  (qwen_dir / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_pretrained(qwen_dir)


def test_unknown_architecture(qwen_dir):
  cfg = json.loads((qwen_dir / "config.json").read_text())
  cfg["architectures"] = ["GPT2LMHeadModel"]
  (qwen_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="unknown architecture.*GPT2LMHeadModel"):
    hf.load_pretrained(qwen_dir)


def _rewrite(qwen_dir, edit):
  path = qwen_dir / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_tensor(qwen_dir):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(qwen_dir, lambda t: t.update({name: t[name][:-1]}))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: shape \(95, 64\)"):
    hf.load_pretrained(qwen_dir)


def test_missing_tensor(qwen_dir):
  _rewrite(qwen_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
  with pytest.raises(ValueError, match=r"missing tensor model\.layers\.0\.self_attn\.k_proj\.bias"):
    hf.load_pretrained(qwen_dir)


def test_no_weights(qwen_dir):
  (qwen_dir / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    hf.load_pretrained(qwen_dir)


def test_save_rejects_params_of_wrong_shape(qwen_dir, tmp_path):
  cfg, params = hf.load_pretrained(qwen_dir)
  params["layers"]["up"] = params["layers"]["up"][:, :, :-1]
  with pytest.raises(ValueError, match="layers/up"):
    hf.save_pretrained(cfg, params, tmp_path / "bad")
  shutil.rmtree(tmp_path / "bad", ignore_errors=True)
