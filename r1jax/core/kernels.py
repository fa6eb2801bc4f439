"""Fused attention kernels for TPU and GPU, behind `attention.attend`.

`choose` picks the form for a model's `attention` setting and the platform the trace is for
(the context mesh's, so an ahead-of-time compile for a TPU slice on a CPU host picks the TPU
kernel): TPU → splash attention (Pallas, Mosaic); GPU → cuDNN's flash attention
(`jax.nn.dot_product_attention(implementation="cudnn")`) where its masks fit, otherwise the
Pallas GPU (Triton) flash kernel; CPU → XLA, the blocked form in attention.py, which stays the
default and the reference. A kernel asked for on CPU runs in Pallas interpret mode (tests);
cuDNN's, as the same call with `implementation="xla"`.

cuDNN's masks are causal plus sequence lengths (right padding), in bf16 / f16 with head widths
of at most 128 in multiples of 8. Unpacked rows fit once each row's real tokens are rotated to
its start: every unpacked batch here holds one contiguous run of real tokens a row (left
padding before the prompt, right padding after the completion), and causal attention does not
change when a row's tokens all move by one offset (the rotary positions are already applied).
Packed rows (several sequences a row) and f32 go to the Pallas kernel.

Kernels take uncached rows: the update, SFT, scoring, the reward models, the sampler's prefill.
A decode step against the KV cache runs core/decode_attention.py on TPU, XLA's form
elsewhere. Who attends to whom goes to a kernel as segment ids, causal within a segment:
packed rows' own ids; otherwise 1 for real tokens and 0 for padding, so
left padding needs no mask. Padding queries then see padding keys; their outputs are never
read, and no real query sees them. A plan with shared-prompt sample ids has no segment-id form
and stays on XLA.

On a mesh, a kernel runs under shard_map: rows over (data, fsdp) and kv heads over tensor
where those divide them, so each chip runs the kernel on its own rows and heads.

Block sizes (queries × keys per tile) per generation, `BLOCKS`: the f32 score tile of a
512 × 1024 block is 2 MiB, a small part of the vector memory of v5e, v5p and v6e; v4 takes
512 × 512. The GPU kernel uses 64 × 64 tiles, which fit the shared memory of A100 / H100 at
head widths up to 128. Rows shorter than a block are padded up to a multiple of 128.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from r1jax.core import sharding
from r1jax.core.config import ATTENTION_IMPLS

_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "pallas_gpu"}
_GPU_KERNELS = ("cudnn", "pallas_gpu")
# (block_q, block_kv) by TPU generation, matched against the device kind ("TPU v5 lite", …).
BLOCKS = {"v4": (512, 512), "v5 lite": (512, 1024), "v5e": (512, 1024), "v5": (512, 1024),
          "v6": (512, 1024)}
DEFAULT_BLOCKS = (512, 1024)
GPU_BLOCKS = (64, 64)
_LANES = 128  # splash tiles are multiples of the TPU's 128 lanes


def _platform_and_kind() -> tuple[str, str]:
  """The platform and device kind the current trace compiles for."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is None:
    device = jax.devices()[0]
  return device.platform, device.device_kind


def choose(impl: str) -> tuple[str, bool]:
  """(kernel, interpret) for a model's `attention` setting: 'auto' by platform; a kernel
  named for another platform than the trace's runs interpreted (CPU tests)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention={impl!r} not in {ATTENTION_IMPLS}")
  platform, _ = _platform_and_kind()
  if impl == "auto":
    return _BY_PLATFORM.get(platform, "xla"), False
  native = _BY_PLATFORM.get(platform)
  same = impl == native or (impl in _GPU_KERNELS and native in _GPU_KERNELS)
  return impl, impl != "xla" and not same


def cudnn_fits(segment_ids_BxT, dtype, head_dim: int, interpret: bool = False) -> bool:
  """Whether cuDNN's flash attention takes these rows (module doc); its XLA stand-in
  (`interpret`) takes any dtype."""
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  shape_ok = head_dim % 8 == 0 and head_dim <= 128
  return segment_ids_BxT is None and (interpret or (half and shape_ok))


def tpu_blocks(device_kind: str, t: int) -> tuple[int, int]:
  """Splash (block_q, block_kv) for a chip generation, capped at the padded row length."""
  kind = device_kind.lower()
  bq, bkv = next((b for name, b in BLOCKS.items() if name in kind), DEFAULT_BLOCKS)
  t_pad = -(-t // _LANES) * _LANES
  return min(bq, t_pad), min(bkv, t_pad)


def kernel_segments(valid_BxT: jax.Array, segment_ids_BxT: jax.Array | None) -> jax.Array:
  """The rows' segment ids as a kernel reads them: packed rows' ids (padding 0), or 1 for
  every real token of an unpacked row."""
  seg_BxT = valid_BxT.astype(jnp.int32) if segment_ids_BxT is None else segment_ids_BxT
  return jnp.where(valid_BxT, seg_BxT, 0).astype(jnp.int32)


def _pad_rows(t: int, multiple: int, *xs_and_axes):
  """Pads each (array, axis) to a length that is a multiple of `multiple` (with zeros)."""
  t_pad = -(-t // multiple) * multiple
  return [x if t_pad == t else jnp.pad(x, [(0, t_pad - t if i == ax else 0)
                                            for i in range(x.ndim)])
          for x, ax in xs_and_axes]


def _splash(q_BxHxTxh, k_BxKxTxh, v_BxKxTxh, seg_BxT, *, interpret: bool, kind: str,
            blocks: tuple[int, int] | None):
  """Causal splash attention within segments, on one device's rows (q pre-scaled)."""
  t, heads = q_BxHxTxh.shape[2], q_BxHxTxh.shape[1]
  bq, bkv = blocks or tpu_blocks(kind, t)
  q_BxHxTxh, k_BxKxTxh, v_BxKxTxh, seg_BxT = _pad_rows(
      t, math.lcm(bq, bkv), (q_BxHxTxh, 2), (k_BxKxTxh, 2), (v_BxKxTxh, 2), (seg_BxT, 1))
  t_pad = seg_BxT.shape[1]
  sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                        block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                        block_kv_dq=bkv)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.CausalMask((t_pad, t_pad))] * heads),
                              block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  out = jax.vmap(kernel)(q_BxHxTxh, k_BxKxTxh, v_BxKxTxh,
                         segment_ids=sa.SegmentIds(q=seg_BxT, kv=seg_BxT))
  return out[:, :, :t]


def _pallas_gpu(q_BxHxTxh, k_BxKxTxh, v_BxKxTxh, seg_BxT, *, interpret: bool, kind: str,
                blocks: tuple[int, int] | None):
  """The Pallas GPU flash kernel, causal within segments (q pre-scaled; kv heads repeated)."""
  del kind
  t, heads = q_BxHxTxh.shape[2], q_BxHxTxh.shape[1]
  bq, bk = blocks or GPU_BLOCKS
  q, k, v = (jnp.repeat(x, heads // x.shape[1], axis=1).swapaxes(1, 2)
             for x in (q_BxHxTxh, k_BxKxTxh, v_BxKxTxh))
  q, k, v, seg_BxT = _pad_rows(t, math.lcm(bq, bk), (q, 1), (k, 1), (v, 1), (seg_BxT, 1))
  # Its fused backward needs as many dq query blocks as dkv key blocks.
  sizes = gpu_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                   block_q_dq=bk, block_kv_dq=bq)
  out = gpu_attention.mha(q, k, v, seg_BxT, sm_scale=1.0, causal=True, block_sizes=sizes,
                          interpret=interpret)
  return out[:, :t].swapaxes(1, 2)


def _rotate(x_BxTx, shift_B):
  """Each row's positions moved left by its shift (cyclically) along axis 1."""
  t = x_BxTx.shape[1]
  idx_BxT = (jnp.arange(t)[None] + shift_B[:, None]) % t
  return jnp.take_along_axis(x_BxTx, idx_BxT.reshape(idx_BxT.shape + (1,) * (x_BxTx.ndim - 2)),
                             axis=1)


def _cudnn(q_BxHxTxh, k_BxKxTxh, v_BxKxTxh, seg_BxT, *, interpret: bool, kind: str,
           blocks: tuple[int, int] | None):
  """cuDNN's causal flash attention with sequence lengths, each row's real run rotated to its
  start and back (q pre-scaled; GQA native). Interpreted: the same call on XLA."""
  del kind, blocks
  real_BxT = seg_BxT > 0
  start_B = jnp.argmax(real_BxT, axis=1).astype(jnp.int32)
  length_B = jnp.maximum(jnp.sum(real_BxT, axis=1, dtype=jnp.int32), 1)  # all padding: 1 key
  q, k, v = (_rotate(x.swapaxes(1, 2), start_B) for x in (q_BxHxTxh, k_BxKxTxh, v_BxKxTxh))
  o_BxTxHxh = jax.nn.dot_product_attention(
      q, k, v, scale=1.0, is_causal=True, query_seq_lengths=length_B,
      key_value_seq_lengths=length_B, implementation="xla" if interpret else "cudnn")
  return _rotate(o_BxTxHxh, -start_B).swapaxes(1, 2)


_KERNELS = {"splash": _splash, "pallas_gpu": _pallas_gpu, "cudnn": _cudnn}


def fused_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, valid_BxT, segment_ids_BxT,
                    kernel: str, interpret: bool, blocks: tuple[int, int] | None = None):
  """softmax(q·kᵀ/√h)·v of uncached rows by a fused kernel, causal within the segments.

  Same layouts as `attention.attend`; on a context mesh, under shard_map (module doc).
  `blocks` (queries, keys per tile) overrides the generation's."""
  b, t, kv_heads, g, hd = q_BxTxKxJxh.shape
  dtype = v_BxKxXxh.dtype
  if kernel == "cudnn" and not cudnn_fits(segment_ids_BxT, dtype, hd, interpret):
    kernel = "pallas_gpu"
  q_BxHxTxh = (q_BxTxKxJxh * (1.0 / math.sqrt(hd))).astype(dtype).reshape(
      b, t, kv_heads * g, hd).transpose(0, 2, 1, 3)
  k_BxKxXxh = k_BxKxhxX.swapaxes(2, 3)
  seg_BxT = kernel_segments(valid_BxT, segment_ids_BxT)
  _, kind = _platform_and_kind()
  run = functools.partial(_KERNELS[kernel], interpret=interpret, kind=kind, blocks=blocks)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:  # rows and kv heads split as the batch's and the weights' tables say
    rows = sharding.logical_to_spec(("batch",), (b,), mesh)[0]
    heads = sharding.logical_to_spec(("kv",), (kv_heads,), mesh)[0]
    spec = P(rows, heads, None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)),
                        out_specs=spec, check_vma=False)
  o_BxHxTxh = run(q_BxHxTxh, k_BxKxXxh.astype(dtype), v_BxKxXxh.astype(dtype), seg_BxT)
  return o_BxHxTxh.transpose(0, 2, 1, 3).reshape(b, t, kv_heads, g, hd).astype(dtype)
