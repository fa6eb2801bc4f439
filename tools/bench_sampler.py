"""Sampler throughput: r1jax's jitted sampler vs HF generate on the same checkpoint and batch.

  python tools/bench_sampler.py --hf_dir=DIR --prompts=8 --group=8 --new_tokens=1024 --compare_hf
  python tools/bench_sampler.py --make_random=3.5m --hf_dir=/tmp/q3p5m --compare_hf
  python tools/bench_sampler.py --make_random=3.5m --r1_shaped --hf_dir=/tmp/r1s --new_tokens=1024 --compare_hf

Both draw `group` samples per prompt at temperature 1 with the KV cache on. A row stops
at the checkpoint's EOS when its config.json has one (an R1-shaped checkpoint: heavy-tailed
lengths), as training does; without one every row generates exactly `new_tokens` tokens.
Rates count useful tokens: each row's real completion, up to and including its EOS.
Compilation (r1jax) and a warm-up call (both) are excluded and reported separately; the
rate is the median over `--repeats` timed calls, the two engines taking turns call by
call. The rows are split over one CPU device per core, as `python -m r1jax.main` does
(`--cpu_devices=N` to choose, 0 for one device). Prints one JSON line with the mean and
max completion lengths of each engine.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import checkpoint_eos, checkpoint_flags, random_prompts, rollout_flags

_CKPT = checkpoint_flags()
_ROLL = rollout_flags("Param and compute dtype, for both engines.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per engine, alternating (median).")
_PAUSE = flags.DEFINE_float("pause_s", 1.0, "Idle seconds before each timed call.")
_COMPARE = flags.DEFINE_bool("compare_hf", False, "Also time transformers' generate.")

def r1jax_engine(batch):
  """(call, compile_s, num_params): call(i) samples the batch once and returns its
  completion lengths."""
  import jax
  from r1jax.core import hf
  from r1jax.generation import sampler
  from r1jax.core import sharding
  n = jax.device_count()
  mesh = sharding.make_mesh((n, 1, 1)) if n > 1 else None  # rows over the CPU cores
  cfg, params = hf.load_pretrained(_CKPT.hf_dir.value, mesh=mesh, param_dtype=_ROLL.dtype.value,
                                   compute_dtype=_ROLL.dtype.value)
  smp = sampler.Sampler(cfg, mesh)
  sp = sampler.SamplingParams(temperature=1.0, max_new_tokens=_NEW.value,
                              eos_id=checkpoint_eos(_CKPT.hf_dir.value))

  def call(i):
    out = jax.block_until_ready(smp.generate(params, batch, sp, jax.random.key(i),
                                             group=_ROLL.group.value))
    return jax.device_get(out.mask).sum(1)

  t0 = time.perf_counter()
  call(0)
  return call, time.perf_counter() - t0, cfg.num_params


def hf_engine(batch):
  """call(i) runs transformers' generate on the same batch once; returns the lengths."""
  import numpy as np
  import torch
  import transformers
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_ROLL.dtype.value]
  m = transformers.AutoModelForCausalLM.from_pretrained(_CKPT.hf_dir.value, dtype=dtype).eval()
  eos = checkpoint_eos(_CKPT.hf_dir.value)
  s = max(map(len, batch))
  ids = np.zeros((len(batch), s), np.int64)
  mask = np.zeros((len(batch), s), np.int64)
  for i, p in enumerate(batch):
    ids[i, s - len(p):], mask[i, s - len(p):] = p, 1
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=_NEW.value,
            num_return_sequences=_ROLL.group.value, use_cache=True, pad_token_id=0, eos_token_id=eos)
  if eos is None:
    kw["min_new_tokens"] = _NEW.value

  def call(i):
    torch.manual_seed(i)
    with torch.no_grad():
      out = m.generate(**kw)
    comp = out[:, s:].numpy()
    if eos is None:
      assert comp.shape == (len(batch) * _ROLL.group.value, _NEW.value)
      return np.full(len(comp), _NEW.value)
    # Up to and including the first EOS; rows without one ran the whole budget.
    hit = comp == eos
    return np.where(hit.any(1), hit.argmax(1) + 1, comp.shape[1])

  call(0)  # warm-up
  return call


def timed(call, i):
  t0 = time.perf_counter()
  lengths = call(i)
  return lengths, time.perf_counter() - t0


def main(argv):
  del argv
  _CKPT.prepare()
  import numpy as np
  vocab = json.load(open(os.path.join(_CKPT.hf_dir.value, "config.json")))["vocab_size"]
  batch = random_prompts(vocab, _ROLL.prompts.value, _ROLL.prompt_len.value)
  fixed = checkpoint_eos(_CKPT.hf_dir.value) is None
  engines = {"r1jax": None, "hf": None}
  engines["r1jax"], compile_s, params = r1jax_engine(batch)
  if _COMPARE.value:
    engines["hf"] = hf_engine(batch)
  # Alternate the engines call by call, so drift in the machine's speed hits
  # both; pause at each switch so the other engine's idle threads (torch's
  # OpenMP pool spins after each op) have gone to sleep before the clock starts.
  rates = {name: [] for name, call in engines.items() if call}
  lengths = {name: [] for name in rates}
  for i in range(_REPEATS.value):
    for name in rates:
      time.sleep(_PAUSE.value)
      got, seconds = timed(engines[name], i + 1)
      assert not fixed or got.sum() == len(got) * _NEW.value, (name, got)
      rates[name].append(got.sum() / seconds)
      lengths[name].append(got)
  r1_rate = statistics.median(rates["r1jax"])
  result = dict(r1jax_tokens_per_s=round(r1_rate, 1), compile_s=round(compile_s, 2))
  for name, per_call in lengths.items():
    every = np.concatenate(per_call)
    result.update({f"{name}_mean_length": round(float(every.mean()), 1),
                   f"{name}_median_length": float(np.median(every)),
                   f"{name}_max_length": int(every.max())})
  if _COMPARE.value:
    hf_rate = statistics.median(rates["hf"])
    result.update(hf_tokens_per_s=round(hf_rate, 1), ratio=round(r1_rate / hf_rate, 2))
  import jax
  result.update(params=params, sequences=_ROLL.prompts.value * _ROLL.group.value,
                new_tokens=_NEW.value, eos=checkpoint_eos(_CKPT.hf_dir.value), dtype=_ROLL.dtype.value, device=jax.devices()[0].device_kind,
                cpu_devices=jax.device_count(), repeats=_REPEATS.value, pause_s=_PAUSE.value,
                machine=f"{platform.machine()} {os.cpu_count()} cores")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
