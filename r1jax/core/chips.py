"""Accelerator slices as an ahead-of-time compile sees them: chip numbers, topology meshes,
the roofline and analytic FLOPs.

`CHIPS` holds each TPU generation's HBM per chip, peak dense bf16 FLOP/s and HBM bandwidth,
from Google Cloud's published TPU specifications. `topology_devices("v5p:2x2x4")` describes a
slice with libtpu on this host (no TPU needed; the `tpu` extra installs libtpu); its devices
go to `sharding.make_mesh`. XLA's cost analysis does not count the work inside Mosaic kernel
calls, so FLOPs are counted here from the model's shape (`forward_flops`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from jax.experimental import topologies

from r1jax.core.config import ModelConfig

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's memory and speed."""

  name: str
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1.64e12),
}
INSTALL_HINT = ('libtpu is needed to compile for a TPU slice on this host: '
                'pip install -e ".[tpu]" (the jax[tpu] wheel of the pinned jax), then run with '
                'JAX_PLATFORMS=cpu')


def chip_of(topology: str) -> Chip:
  """The chip of a topology name such as 'v5e:4x4' or 'v5p:2x2x4'."""
  generation = topology.split(":")[0].lower()
  if generation not in CHIPS:
    raise ValueError(f"topology {topology!r}: generation {generation!r} not in {sorted(CHIPS)}")
  return CHIPS[generation]


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of a TPU slice (or `num_slices` of them), described by libtpu on this host."""
  chip_of(topology)
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(INSTALL_HINT)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server
  # Describing a slice claims no chip: other processes may load libtpu at the same time.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  if topology.lower().startswith("v4"):  # one device a chip (its two cores as one)
    kwargs["chip_config_name"] = "megacore"
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                           **kwargs).devices)


def layer_matmul_params(cfg: ModelConfig) -> int:
  """Weights one token multiplies through per decoder layer (attention and MLP)."""
  d, hd = cfg.hidden, cfg.head_dim
  return d * hd * (2 * cfg.heads + 2 * cfg.kv_heads) + 3 * d * cfg.mlp_dim


def token_matmul_flops(cfg: ModelConfig) -> float:
  """Forward matmul FLOPs of one token: every layer's weights and the unembedding (the
  embedding is a lookup)."""
  return 2.0 * (cfg.layers * layer_matmul_params(cfg) + cfg.hidden * cfg.vocab_size)


def forward_flops(cfg: ModelConfig, tokens: int, context: float) -> float:
  """Forward FLOPs of `tokens` tokens that each attend to `context` keys on average: the
  matmuls and attention's two products (4 × heads × head_dim a key)."""
  attention = 4 * cfg.layers * cfg.heads * cfg.head_dim * context
  return float(tokens) * (token_matmul_flops(cfg) + attention)


def roofline_s(flops_per_chip: float, bytes_per_chip: float, chip: Chip) -> tuple[float, str]:
  """(lower bound on seconds, what bounds it): the chip's peak FLOP/s or HBM bandwidth."""
  compute, memory = flops_per_chip / chip.peak_flops, bytes_per_chip / chip.hbm_bandwidth
  return (compute, "compute") if compute >= memory else (memory, "memory")
