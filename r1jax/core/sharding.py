"""Device mesh, logical-axis rules and the shardings of params, batches and caches.

The mesh has three axes: `data` (replicas: batch split, params replicated),
`fsdp` (batch split and params sharded, gathered per layer by GSPMD) and
`tensor` (heads / mlp / vocab split). All axes are `AxisType.Auto`: the model
code carries no sharding annotations of its own, and XLA's propagation from
the explicit in/out shardings of each jitted function decides the rest.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The whole logical-axis table. A dimension is left unsharded when the mesh
# axes don't divide it (e.g. 2 kv heads on tensor=4), rather than failing.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
}



# Each accelerator plugin of JAX, and the device files its hardware shows on a host.
_DEVICE_FILES = {"libtpu": ("/dev/accel*", "/dev/vfio/[0-9]*"),
                 "jax_cuda12_plugin": ("/dev/nvidia[0-9]*",),
                 "jax_cuda13_plugin": ("/dev/nvidia[0-9]*",),
                 "jax_rocm7_plugin": ("/dev/kfd",)}


def _accelerator_plugin() -> bool:
  """Whether a GPU / TPU backend for JAX is installed and its device is there (checked
  without starting JAX). A plugin without its device (libtpu installed for ahead-of-time
  compiles on a CPU machine) leaves a CPU host, which still gets one device per core."""
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return False
  return any(importlib.util.find_spec(m) is not None and any(glob.glob(f) for f in files)
             for m, files in _DEVICE_FILES.items())


def cpu_devices_to_request(flag: int, xla_flags: str, env_count: str = "") -> int:
  """How many CPU devices to ask JAX for, before it starts (`jax_num_cpu_devices`; 0 = leave
  JAX's default of one). flag ≥ 0 is taken as given; -1 means one device per core, since
  XLA:CPU runs one device's small decode matmuls on about one core, so a mesh over the cores
  is the fast layout, unless XLA_FLAGS already fakes a device count (the tests' 8 devices)
  or JAX_NUM_CPU_DEVICES (`env_count`) sets one, or an accelerator plugin is installed (a
  GPU / TPU host computes on its accelerators and needs no CPU mesh)."""
  if flag >= 0:
    return flag
  if "xla_force_host_platform_device_count" in xla_flags or env_count or _accelerator_plugin():
    return 0
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to fill the devices; checks the product."""
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  fills = [i for i, s in enumerate(shape) if s == -1]
  if len(fills) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} cannot fill {num_devices} devices")
    shape[fills[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
        f"but {num_devices} are available (CPU runs: --cpu_devices=N sets how many)")
  return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  resolved = mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def policy_and_reward_meshes(shape: Sequence[int], reward_devices: int = 0,
                             devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
  """(policy mesh, reward-model mesh): with `reward_devices`, the last that many devices are
  the reward models' own FSDP mesh and the policy's `shape` fills the rest; with 0 the reward
  models share the policy's mesh."""
  devices = list(devices if devices is not None else jax.devices())
  if not reward_devices:
    mesh = make_mesh(shape, devices)
    return mesh, mesh
  if not 0 < reward_devices < len(devices):
    raise ValueError(f"mesh.reward_devices={reward_devices} must leave the policy at least "
                     f"one of the {len(devices)} devices")
  return (make_mesh(shape, devices[:-reward_devices]),
          make_mesh((1, -1, 1), devices[-reward_devices:]))


def regroup(mesh: Mesh, shape: Sequence[int]) -> Mesh:
  """The same devices, in the same order, as a (data, fsdp, tensor) mesh of another shape: the
  sampler's decode layout beside the trainer's (`Sampler.decode_weights` moves the weights
  across; programs may take arrays of both, as the device order is the same)."""
  resolved = mesh_shape(shape, mesh.devices.size)
  return Mesh(mesh.devices.reshape(resolved), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """Mesh PartitionSpec for one array: each dim takes the mesh axes that divide it."""
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    axes = []
    for ax in LOGICAL_RULES[name] if name else ():
      size = mesh.shape[ax]
      if ax in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in axes) * size) == 0:
        axes.append(ax)
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree, from its logical specs and its shapes."""
  return jax.tree.map(
      lambda spec, a: NamedSharding(mesh, logical_to_spec(tuple(spec), a.shape, mesh)),
      logical_tree, abstract_tree, is_leaf=_is_spec)


def batch_spec(ndim: int, batch: int, mesh: Mesh) -> P:
  """Leading dim over (data, fsdp) where it divides; the rest replicated."""
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1), mesh)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """NamedSharding for a batch-major array of this shape."""
  return NamedSharding(mesh, batch_spec(len(shape), shape[0], mesh))


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
  """KV cache: batch over (data, fsdp), kv heads over tensor where they divide."""
  # k is (B, K, h, S) and v (B, K, S, h): the same spec fits both.
  k = NamedSharding(mesh, logical_to_spec(("batch", "kv", None, None), cache.k[0].shape, mesh))
  valid = NamedSharding(mesh, logical_to_spec(("batch", None), cache.valid.shape, mesh))
  layers = len(cache.k)
  return type(cache)(k=(k,) * layers, v=(k,) * layers, valid=valid,
                     index=NamedSharding(mesh, P()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes of the tree's addressable shards held by each device."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def tree_bytes(tree: Any) -> int:
  """Total logical bytes of a pytree of arrays (or shape structs)."""
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...], shape: Sequence[int]) -> int:
  """Elements in both index boxes (slices as `devices_indices_map` gives them)."""
  n = 1
  for sa, sb, dim in zip(a, b, shape):
    lo = max(sa.indices(dim)[0], sb.indices(dim)[0])
    hi = min(sa.indices(dim)[1], sb.indices(dim)[1])
    n *= max(0, hi - lo)
  return n


def reshard_bytes(shapes: Any, src: Any, dst: Any, itemsize: int | None = None) -> int:
  """The most bytes any one device must receive to go from the `src` shardings to the `dst`
  ones (trees alike, shardings over the same devices): the part of each new shard it did not
  hold before, in `itemsize` bytes an element (default: each array's own)."""
  per_device: dict[Any, int] = {}
  for x, s, d in zip(jax.tree.leaves(shapes), jax.tree.leaves(src), jax.tree.leaves(dst)):
    size = itemsize or np.dtype(x.dtype).itemsize
    held, wanted = s.devices_indices_map(x.shape), d.devices_indices_map(x.shape)
    for device, box in wanted.items():
      new = math.prod(len(range(*b.indices(n))) for b, n in zip(box, x.shape))
      mine = _overlap(held[device], box, x.shape) if device in held else 0
      per_device[device] = per_device.get(device, 0) + (new - mine) * size
  return max(per_device.values(), default=0)


class MeshJit:
  """A jitted function traced, lowered and run with `mesh` as the context mesh: fused
  attention kernels (core/kernels.py) find there the mesh they shard_map over.

  `bound`: host values passed as trailing arguments on every call (inputs of the program,
  not constants in it, so that programs differing only in them are one), placed with
  `bound_sharding` once, at the first call; `lower` takes them as they are (an AOT mesh's
  devices cannot receive them)."""

  def __init__(self, jitted: Any, mesh: Mesh, bound: tuple = (), bound_sharding: Any = None):
    self.jitted, self.mesh, self.bound = jitted, mesh, tuple(bound)
    self._bound_sharding, self._placed = bound_sharding, None

  def __call__(self, *args):
    if self._placed is None:
      with jax.transfer_guard("allow"):  # once per program: not a per-step transfer
        self._placed = jax.device_put(self.bound, self._bound_sharding)
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, *self._placed)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, *self.bound)
