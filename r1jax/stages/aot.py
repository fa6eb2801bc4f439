"""Ahead-of-time compilation of a stage's programs for a TPU slice, from a host without one.

`compile_stage(config, "v5p:2x2x4")` builds the stage's mesh over the slice's devices (libtpu
describes them: core/chips.py), then lowers and compiles, at the stage's real shapes, each
jitted program the stage runs, with the same functions the stage calls:
- rl: the GRPO update (the reference's params in it, or its logprobs in the batch), the
  reference's logprobs beside the rollout and, on the sampler's mesh (`sampler.mesh`), the
  decode layout (one program from the trainer's layout; its report gives both layouts a chip
  and the bytes a chip receives), the prefill and the longest decode segment;
- sft (and distillation): the update;
- reward_model: the Bradley–Terry update;
- generate: the decode layout, the prefill and the longest decode segment.
With `mesh.reward_devices`, the policy's programs get the devices the reward models leave.
Nothing is allocated: every argument is a ShapeDtypeStruct with its sharding. Each program
gives one report: per-chip argument / output / temporary bytes, plus what the stage keeps
resident meanwhile (the train state and reference during a rollout), against the chip's HBM;
compile seconds; FLOPs counted from the model's shape (XLA does not count inside Mosaic
kernels); the roofline bound on its time; the Mosaic kernel calls in it. A program that fails
to compile, or needs more than `HBM_SHARE` of a chip, names the arrays that dominate it.

Shapes are the worst case the stage can meet: every completion at its full budget, prompts at
their token limit, one sequence a row (tight packing holds as many tokens). The rollout's
stop sequences take 4 placeholder ids each (the tokenizer is not needed to compile).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from r1jax.core import chips, checkpoint, decode_attention, sharding
from r1jax.core import model as model_lib
from r1jax.core.config import ModelConfig, grpo_config, opt_config
from r1jax.core.weights import load_model
from r1jax.stages import generate, rl, sft
from r1jax.generation import decode
from r1jax.generation.sampler import SamplingParams, decode_shardings, layout_program
from r1jax.train import batches as batches_lib
from r1jax.train.batches import PackedRollout, PairBatch, SFTBatch
from r1jax.train.logprobs import LogProbs, RefSource, ref_source
from r1jax.train.reward_model import RMTrainer
from r1jax.train.trainer import SFTSettings, Trainer

HBM_SHARE = 0.9  # a program fits when it needs at most this share of a chip's HBM
_STOP_IDS = 4  # placeholder token ids per stop sequence


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program of a stage at its real shapes, with its analytic cost."""

  name: str
  jitted: Any  # has .lower(*args)
  args: tuple  # ShapeDtypeStructs with shardings
  flops: float  # whole program, all chips
  streamed_bytes: float = 0.0  # per chip, read more than once (decode: weights, cache)
  resident: tuple = ()  # arrays the stage keeps on the chips meanwhile (the train state)
  outputs: Any = None  # its outputs (with shardings) where they are new arrays
  notes: dict = dataclasses.field(default_factory=dict)  # more fields for its report
  compiled: tuple | None = None  # (executable, seconds) when building it already compiled it


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _per_chip_bytes(x: jax.ShapeDtypeStruct) -> int:
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return int(np.prod(shape)) * (8 if key else np.dtype(x.dtype).itemsize)  # a key: 2 × u32


def dominant_arrays(args: Any, top: int = 5) -> list[tuple[str, float]]:
  """The arrays (arguments, outputs) that take the most bytes per chip: (path, GiB)."""
  leaves = jax.tree_util.tree_leaves_with_path(args)
  sized = sorted(((jax.tree_util.keystr(p), _per_chip_bytes(x) / chips.GIB) for p, x in leaves
                  if hasattr(x, "sharding")), key=lambda r: -r[1])
  return [(p, round(g, 3)) for p, g in sized[:top]]


def _update_flops(cfg: ModelConfig, rows: int, width: int, passes: int,
                  no_grad_forwards: int = 0) -> float:
  """Training passes over the rows (forward + backward = 3 forwards, one more under full
  remat), plus forwards without a gradient (the reference's)."""
  per_pass = 3 + (1 if cfg.remat == "full" else 0)
  forwards = passes * per_pass + no_grad_forwards
  return forwards * chips.forward_flops(cfg, rows * width, width / 2)


def rl_programs(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh) -> Iterator[Program]:
  """The rl stage's programs at its configured shapes (module doc)."""
  grpo = grpo_config(config.grpo)
  s, t = config.data.max_prompt_tokens, config.sampler.max_new_tokens
  b = config.data.batch
  n = b * grpo.group_size
  trainer = Trainer(cfg, opt_config(config.opt), mesh, grpo)
  params = checkpoint.abstract_params(cfg, mesh)
  state = checkpoint.abstract_like(jax.eval_shape(trainer.init_state, params),
                                   trainer.state_shardings)
  source = ref_source(grpo)
  ref = checkpoint.abstract_like(params, trainer.param_shardings, np.dtype(grpo.ref_dtype))
  width = s + t
  cols = lambda dtype: np.zeros((1, 1), dtype)  # only shapes matter: broadcast below
  fields = dict(tokens=np.int32, positions=np.int32, segment_ids=np.int32, loss_mask=bool,
                weights=np.float32, old_logp=np.float32, advantages=np.float32)
  if source is RefSource.ROLLOUT:
    fields["ref_logp"] = np.float32
  host = PackedRollout(**{k: np.broadcast_to(cols(d), (n, width)) for k, d in fields.items()})
  batch = _abstract(host, trainer.batch_shardings(host))
  with_ref = source is RefSource.UPDATE
  yield Program("grpo_update", trainer.rl_program(batch, with_ref),
                (state, batch, ref if with_ref else None),
                _update_flops(cfg, n, width, grpo.mu, int(with_ref)))
  held = (state, ref) if source is not RefSource.NONE else (state,)
  if source is RefSource.ROLLOUT:
    yield from _ref_beside_rollout(cfg, grpo, mesh, ref, b, s, t, held[:1])
  sp = SamplingParams(temperature=grpo.temperature, top_p=config.sampler.top_p,
                      top_k=config.sampler.top_k, max_new_tokens=t, eos_id=0,
                      stop_ids=_stops(config.sampler.stop))
  decode_mesh = sharding.regroup(mesh, config.sampler.mesh) if config.sampler.get("mesh") else mesh
  for p in sampler_programs(cfg, decode_mesh, b, grpo.group_size, s, t, sp, mesh):
    yield dataclasses.replace(p, resident=held,
                              notes={**p.notes, "decode_mesh": dict(decode_mesh.shape)})


def _stops(stop: Any) -> tuple:
  return tuple(tuple(range(1, _STOP_IDS + 1)) for _ in stop)


def _ref_beside_rollout(cfg, grpo, mesh, ref, b, s, t, held) -> Iterator[Program]:
  """The reference's logprobs of a rollout's samples, packed, run on the mesh while the host
  scores them (worst case: one sequence a row)."""
  n = b * grpo.group_size
  logp = LogProbs(cfg, grpo, mesh)
  width = grpo.pack_len or s + t
  rows = {name: jax.ShapeDtypeStruct((n, width), np.int32, sharding=logp.row_sharding(n))
          for name in ("tokens", "positions", "segment_ids")}
  yield Program("ref_logprobs", logp.packed_program(rows), (ref, rows),
                chips.forward_flops(cfg, n * width, width / 2), resident=held)


def sampler_programs(cfg: ModelConfig, mesh, b: int, group: int, s: int, t: int,
                     sp: SamplingParams, train_mesh=None) -> Iterator[Program]:
  """On the sampler's mesh: the decode layout of the weights (one program from the trainer's
  layout on `train_mesh`, the same chips grouped otherwise), the prefill of B prompts, and
  the longest decode segment, N = B·G rows over S + T cache slots for T steps."""
  params = checkpoint.abstract_params(cfg, train_mesh or mesh)
  layout_fn = layout_program(cfg, params, mesh)
  dtype_bytes = np.dtype(cfg.compute_dtype).itemsize
  there = sharding.tree_shardings(model_lib.param_axes(cfg), params, mesh)
  notes = {"train_layout_gib": sum(_per_chip_bytes(x) for x in jax.tree.leaves(params))
           / chips.GIB,
           "reshard_moved_gib": sharding.reshard_bytes(
               params, [x.sharding for x in jax.tree.leaves(params)], jax.tree.leaves(there),
               dtype_bytes) / chips.GIB}
  start = time.monotonic()
  try:  # its output layout is the prefill's and the segments' input
    compiled = (layout_fn.lower(params).compile(), time.monotonic() - start)
  except Exception:  # pylint: disable=broad-except  (compile_program reports it)
    compiled = None
  if compiled is None:
    yield Program("decode_layout", layout_fn, (params,), 0.0, notes=notes)
    return
  laid = _abstract(jax.eval_shape(layout_fn, params), compiled[0].output_shardings)
  notes["decode_layout_gib"] = sum(_per_chip_bytes(x) for x in jax.tree.leaves(laid)) / chips.GIB
  yield Program("decode_layout", layout_fn, (params,), 0.0, notes=notes, compiled=compiled)
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                   sharding=sharding.batch_sharding(mesh, shape))
  n = b * group
  with jax.set_mesh(mesh):  # the sampler's cache: whole blocks of the decode kernel's
    m = decode_attention.slot_multiple(cfg.attention)
  window = -(-(s + t) // m) * m - s
  pre = functools.partial(decode.prefill, cfg=cfg, sp=sp, group=group, window=window)
  pre_args = (laid, rows((b, s), np.int32), rows((b, s), bool), rows((n,), np.int32))
  st_shape = jax.eval_shape(pre, *pre_args)
  st_shardings = decode_shardings(st_shape, mesh)
  yield Program("prefill", sharding.MeshJit(jax.jit(pre, out_shardings=st_shardings), mesh),
                pre_args, chips.forward_flops(cfg, b * s, s / 2),
                outputs=_abstract(st_shape, st_shardings))
  seg = functools.partial(decode.segment, cfg=cfg, sp=sp)
  rep = sharding.replicated(mesh)
  seg_args = (laid, _abstract(st_shape, st_shardings),
              jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
              jax.ShapeDtypeStruct((), np.int32, sharding=rep),
              jax.ShapeDtypeStruct((), np.int32, sharding=rep))
  seg_out = decode_shardings(jax.eval_shape(seg, *seg_args), mesh)
  weights = sum(_per_chip_bytes(x) for x in jax.tree.leaves(laid)) * mesh.shape["fsdp"]
  cache = sum(_per_chip_bytes(x) for x in jax.tree.leaves(seg_args[1].cache))
  yield Program("decode_segment",
                sharding.MeshJit(jax.jit(seg, out_shardings=seg_out, donate_argnums=(1,)), mesh),
                seg_args, chips.forward_flops(cfg, n * t, s + t / 2),
                streamed_bytes=t * (weights + cache / 2))


def sft_programs(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh) -> Iterator[Program]:
  """The sft stage's update; with `distill.top_k`, the teacher's top-k rides in the batch."""
  d = config.data
  kd = config.get("distill") or {"top_k": 0, "kd_weight": 0.5}
  trainer = Trainer(cfg, opt_config(config.opt), mesh,
                    sft=SFTSettings(microbatches=config.microbatches, kd_weight=kd["kd_weight"]))
  params = checkpoint.abstract_params(cfg, mesh)
  state = checkpoint.abstract_like(jax.eval_shape(trainer.init_state, params),
                                   trainer.state_shardings)
  rows, width, k = d.batch, d.seq_len, kd["top_k"]
  cols = {"tokens": np.int32, "mask": bool, "loss_mask": bool, "positions": np.int32,
          "segment_ids": np.int32}
  host = {name: np.zeros((rows, width), dtype) for name, dtype in cols.items()}
  if k:
    host.update(top_ids=np.zeros((rows, width, k), np.int32),
                top_logprobs=np.zeros((rows, width, k), np.float32),
                teacher_mask=np.zeros((rows, width), bool))
  host = SFTBatch(**host)
  batch = _abstract(host, trainer.batch_shardings(host))
  yield Program("sft_update", trainer.sft_program(batch), (state, batch),
                _update_flops(cfg, rows, width, 1))


def reward_model_programs(config: ml_collections.ConfigDict, cfg: ModelConfig,
                          mesh) -> Iterator[Program]:
  """The reward_model stage's Bradley–Terry update: B pairs, both sides of `max_len` tokens."""
  d = config.data
  trainer = RMTrainer(cfg, opt_config(config.opt), mesh, config.microbatches)
  side = lambda dtype: np.zeros((d.batch, d.max_len), dtype)
  host = PairBatch(side(np.int32), side(bool), side(np.int32), side(bool))
  batch = _abstract(host, batches_lib.batch_shardings(host, config.microbatches, mesh))
  yield Program("rm_update", trainer.program(batch), (trainer.abstract_state, batch),
                _update_flops(cfg, 2 * d.batch, d.max_len, 1))


def generate_programs(config: ml_collections.ConfigDict, cfg: ModelConfig,
                      mesh) -> Iterator[Program]:
  """The generate stage's decode: `batch_prompts` prompts × k samples, prompts at their token
  limit, every response at its budget; the weights laid out in place (one mesh)."""
  s = config.sampler
  sp = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      max_new_tokens=s.max_new_tokens, eos_id=0, stop_ids=_stops(s.stop),
                      record_top_k=config.output.top_k_logprobs)
  yield from sampler_programs(cfg, mesh, config.batch_prompts, config.k,
                              config.data.max_prompt_tokens, s.max_new_tokens, sp)


# stage -> (its config check, its programs)
PROGRAMS: dict[str, tuple[Callable, Callable]] = {
    "rl": (rl.validate, rl_programs), "sft": (sft.validate, sft_programs),
    "reward_model": (lambda config: None, reward_model_programs),
    "generate": (generate.validate, generate_programs)}


def compile_program(p: Program, chip: chips.Chip, n_chips: int) -> dict[str, Any]:
  """Lower and compile one program; its report (module doc)."""
  start = time.monotonic()
  arrays = {"args": p.args, "out": p.outputs}
  try:
    compiled, seconds = p.compiled or (p.jitted.lower(*p.args).compile(), None)
  except Exception as e:  # pylint: disable=broad-except  (reported with the program's name)
    return {"program": p.name, "error": f"{type(e).__name__}: {str(e)[:600]}",
            "dominant_gib": dominant_arrays(arrays)}
  seconds = time.monotonic() - start if seconds is None else seconds
  mem = compiled.memory_analysis()
  resident = sum(_per_chip_bytes(x) for x in jax.tree.leaves(p.resident))
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes + resident)
  touched = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             + p.streamed_bytes)
  bound, by = chips.roofline_s(p.flops / n_chips, touched, chip)
  out = {"program": p.name, "compile_s": round(seconds, 1),
         "argument_gib": mem.argument_size_in_bytes / chips.GIB,
         "output_gib": mem.output_size_in_bytes / chips.GIB,
         "temp_gib": mem.temp_size_in_bytes / chips.GIB,
         "alias_gib": mem.alias_size_in_bytes / chips.GIB, "resident_gib": resident / chips.GIB,
         "total_gib": total / chips.GIB, "hbm_gib": chip.hbm_bytes / chips.GIB,
         "hbm_share": total / chip.hbm_bytes, "fits": total <= HBM_SHARE * chip.hbm_bytes,
         "tflops": p.flops / 1e12, "roofline_s": bound, "bound_by": by,
         "mosaic_calls": len(re.findall(r"tpu_custom_call", compiled.as_text())), **p.notes}
  if not out["fits"]:
    parts = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
             "temporaries": mem.temp_size_in_bytes, "resident": resident}
    out["largest_part"] = max(parts, key=parts.get)  # temporaries: activations, not arrays
    out["dominant_gib"] = dominant_arrays({**arrays, "resident": p.resident})
  return out


def compile_stage(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
                  only: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
  """One report per program of the config's stage (or the ones named in `only`), compiled for
  the slice (module doc)."""
  stage = config.stage
  if stage not in PROGRAMS:
    raise ValueError(f"aot: stage {stage!r} has no program list; one of {sorted(PROGRAMS)}")
  check, programs = PROGRAMS[stage]
  check(config)
  chip = chips.chip_of(topology)
  devices = chips.topology_devices(topology, num_slices)
  mesh, _ = sharding.policy_and_reward_meshes(  # the reward models' own devices left out
      config.mesh.shape, config.mesh.get("reward_devices", 0), devices)
  cfg, _ = load_model(config.model, mesh, abstract=True)
  d = config.data
  longest = (d.seq_len if stage == "sft" else d.max_len if stage == "reward_model"
             else d.max_prompt_tokens + config.sampler.max_new_tokens)
  if longest > cfg.max_position:
    raise ValueError(f"aot: {longest} tokens a row exceed the model's max_position "
                     f"{cfg.max_position}")
  head = {"stage": stage, "topology": topology, "num_slices": num_slices,
          "chips": len(devices), "chip": chip.name, "mesh": dict(mesh.shape),
          "params_b": cfg.num_params / 1e9}
  for program in programs(config, cfg, mesh):
    if not only or program.name in only:
      yield {**head, **compile_program(program, chip, len(devices))}

