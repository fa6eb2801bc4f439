"""Sharding: meshes from config, sharded forward == single device, bytes per device."""

import functools
import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax.core import model
from r1jax.core import sharding
from r1jax.core.config import ModelConfig
from r1jax.core.weights import load_model

CFG = ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                  mlp_dim=128, qkv_bias=True, tie_embeddings=False)
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]


def test_mesh_shape_fill_and_errors():
  assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    sharding.mesh_shape((2, 3, 1), 8)
  with pytest.raises(ValueError, match="cannot fill"):
    sharding.mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape((-1, -1, 1), 8)
  assert sharding.make_mesh((-1, 1, 1)).shape == {"data": 8, "fsdp": 1, "tensor": 1}
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  assert one.devices.size == 1


def test_logical_rules_skip_axes_that_do_not_divide():
  mesh = sharding.make_mesh((1, 2, 4))
  # 2 kv heads cannot be split 4 ways: replicated instead of failing.
  assert sharding.logical_to_spec(("embed", "kv", None), (64, 2, 16), mesh) == P("fsdp", None, None)
  assert sharding.logical_to_spec(("embed", "heads", None), (64, 8, 16), mesh) == P("fsdp", "tensor", None)
  assert sharding.batch_spec(2, 6, sharding.make_mesh((2, 4, 1))) == P("data", None)
  assert sharding.batch_spec(2, 8, sharding.make_mesh((2, 4, 1))) == P(("data", "fsdp"), None)


@pytest.fixture(scope="module")
def reference():
  params = model.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[::3, :4] = False
  logits = np.asarray(jax.jit(functools.partial(model.forward, cfg=CFG))(
      jax.device_put(params, jax.devices()[0]), tokens, mask_BxT=mask))
  return params, tokens, mask, logits


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_matches_single_device(reference, shape):
  params, tokens, mask, ref_logits = reference
  mesh = sharding.make_mesh(shape)
  # The stages' random init: straight into the shardings, nothing on one device first.
  _, sharded = load_model(ml_collections.ConfigDict({**CFG.to_dict(), "hf_dir": ""}), mesh)
  # Sharded init draws the same values (up to f32 rounding of the fused scale).
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  sharded = jax.device_put(params, jax.tree.map(lambda a: a.sharding, sharded))
  batch = sharding.batch_sharding(mesh, tokens.shape)
  fwd = jax.jit(lambda p, t, m: model.forward(p, t, CFG, mask_BxT=m),
                in_shardings=(jax.tree.map(lambda a: a.sharding, sharded), batch, batch),
                out_shardings=NamedSharding(mesh, sharding.batch_spec(3, 8, mesh)))
  logits = fwd(sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch))
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5)

  # Each device holds ~1/(fsdp*tensor) of the params: `data` replicates by design.
  total = sharding.tree_bytes(sharded)
  per_device = sharding.bytes_per_device(sharded)
  shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
  fractions = [b / total for b in per_device.values()]
  print(f"mesh {shape}: per-device fraction of {total} param bytes = "
        f"{min(fractions):.4f}..{max(fractions):.4f} (ideal {1 / shards:.4f})")
  assert len(per_device) == 8
  # Exactly what the specs imply (norms and biases too small to split add a bit).
  implied = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                for a in jax.tree.leaves(sharded))
  assert set(per_device.values()) == {implied}
  assert 1 / shards <= max(fractions) <= 1 / shards * 1.05


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_sharded_cache_decode_matches(reference, shape):
  params, tokens, mask, ref_logits = reference
  mesh = sharding.make_mesh(shape)
  sharded = jax.device_put(params, sharding.tree_shardings(
      model.param_axes(CFG), params, mesh))
  cache = model.init_cache(CFG, 8, 16)
  cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh))
  assert cache.k[0].sharding.spec == P(("data", "fsdp"), "tensor", None, None)
  step = jax.jit(lambda p, t, c, m: model.forward_cached(p, t, CFG, c, mask_BxT=m),
                 donate_argnums=(2,))
  logits, cache = step(sharded, tokens[:, :9], cache, mask[:, :9])
  got = [np.asarray(logits)]
  for i in range(9, 12):
    logits, cache = step(sharded, tokens[:, i:i + 1], cache, mask[:, i:i + 1])
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  np.testing.assert_allclose(got[mask], ref_logits[mask], atol=1e-5)


def test_reward_models_on_devices_of_their_own():
  devices = jax.devices()
  policy, rm = sharding.policy_and_reward_meshes((-1, 1, 1), 2)
  assert list(policy.devices.flat) == devices[:6] and list(rm.devices.flat) == devices[6:]
  assert rm.shape == {"data": 1, "fsdp": 2, "tensor": 1}
  same, also = sharding.policy_and_reward_meshes((2, 2, 2), 0)
  assert same is also and same.devices.size == 8
  for bad in (8, -1):
    with pytest.raises(ValueError, match="reward_devices"):
      sharding.policy_and_reward_meshes((-1, 1, 1), bad)


def test_regroup_keeps_the_device_order_and_refuses_a_wrong_size():
  mesh = sharding.make_mesh((1, 4, 2))
  decode_mesh = sharding.regroup(mesh, (2, 1, 4))
  assert list(decode_mesh.devices.flat) == list(mesh.devices.flat)
  assert decode_mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
    sharding.regroup(mesh, (3, 1, 2))


def test_reshard_bytes_counts_what_each_device_lacks():
  """Against a count by hand: a (64, 32) f32 array sharded over 8 devices by rows, moved to
  the (2, 1, 4) regrouping with its columns over tensor. Device i held rows 8i..8i+8; it now
  needs all 64 rows × its 8 columns (512 elements), of which it held 8 × 8 = 64."""
  mesh = sharding.make_mesh((1, 8, 1))
  regrouped = sharding.regroup(mesh, (2, 1, 4))
  x = jax.ShapeDtypeStruct((64, 32), np.float32)
  rows, cols = NamedSharding(mesh, P("fsdp", None)), NamedSharding(regrouped, P(None, "tensor"))
  assert sharding.reshard_bytes([x], [rows], [cols]) == (512 - 64) * 4
  assert sharding.reshard_bytes([x], [rows], [cols], itemsize=2) == (512 - 64) * 2
  assert sharding.reshard_bytes([x], [rows], [rows]) == 0  # nothing moves
  everything = NamedSharding(regrouped, P())
  assert sharding.reshard_bytes([x], [rows], [everything]) == (64 * 32 - 64 * 4) * 4
