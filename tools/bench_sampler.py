"""Sampler throughput: r1jax's jitted sampler vs HF generate on the same checkpoint and batch.

  python tools/bench_sampler.py --hf_dir=DIR --prompts=8 --group=8 --new_tokens=64 --compare_hf
  python tools/bench_sampler.py --make_random=3.5m --hf_dir=/tmp/q3p5m --compare_hf

Both draw `group` samples per prompt at temperature 1 with the KV cache on; EOS
is disabled so every row generates exactly `new_tokens` tokens. Compilation
(r1jax) and a warm-up call (both) are excluded and reported separately; the
rate is the median over `--repeats` timed calls. Prints one JSON line.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import SHAPES, make_random, random_prompts

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint folder (created by --make_random).")
_MAKE = flags.DEFINE_enum("make_random", None, list(SHAPES),
                          "First write a random Qwen2 of this shape to --hf_dir.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts per batch (B).")
_GROUP = flags.DEFINE_integer("group", 8, "Samples per prompt (G); N = B*G sequences.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Longest prompt (lengths vary 50-100%).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per engine (median reported).")
_COMPARE = flags.DEFINE_bool("compare_hf", False, "Also time transformers' generate.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Param and compute dtype, for both engines.")
flags.mark_flag_as_required("hf_dir")

def bench_r1jax(batch):
  import jax
  from r1jax import hf, sampler
  cfg, params = hf.load_pretrained(_HF_DIR.value, param_dtype=_DTYPE.value,
                                   compute_dtype=_DTYPE.value)
  smp = sampler.Sampler(cfg)
  sp = sampler.SamplingParams(temperature=1.0, max_new_tokens=_NEW.value)
  t0 = time.perf_counter()
  out = smp.generate(params, batch, sp, jax.random.key(0), group=_GROUP.value)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(_REPEATS.value):
    t0 = time.perf_counter()
    out = jax.block_until_ready(smp.generate(params, batch, sp, jax.random.key(i + 1),
                                             group=_GROUP.value))
    times.append(time.perf_counter() - t0)
  tokens = int(out.mask.sum())
  assert tokens == len(batch) * _GROUP.value * _NEW.value
  return tokens / statistics.median(times), compile_s, cfg.num_params


def bench_hf(batch):
  import numpy as np
  import torch
  import transformers
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_DTYPE.value]
  m = transformers.AutoModelForCausalLM.from_pretrained(_HF_DIR.value, dtype=dtype).eval()
  s = max(map(len, batch))
  ids = np.zeros((len(batch), s), np.int64)
  mask = np.zeros((len(batch), s), np.int64)
  for i, p in enumerate(batch):
    ids[i, s - len(p):], mask[i, s - len(p):] = p, 1
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=_NEW.value,
            min_new_tokens=_NEW.value, num_return_sequences=_GROUP.value, use_cache=True,
            pad_token_id=0, eos_token_id=None)
  with torch.no_grad():
    m.generate(**kw)  # warm-up
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      out = m.generate(**kw)
      times.append(time.perf_counter() - t0)
  assert out.shape == (len(batch) * _GROUP.value, s + _NEW.value)
  return len(batch) * _GROUP.value * _NEW.value / statistics.median(times)


def main(argv):
  del argv
  if _MAKE.value:
    make_random(_HF_DIR.value, _MAKE.value)
  vocab = json.load(open(os.path.join(_HF_DIR.value, "config.json")))["vocab_size"]
  batch = random_prompts(vocab, _PROMPTS.value, _PROMPT_LEN.value)
  r1_rate, compile_s, params = bench_r1jax(batch)
  result = dict(r1jax_tokens_per_s=round(r1_rate, 1), compile_s=round(compile_s, 2))
  if _COMPARE.value:
    hf_rate = bench_hf(batch)
    result.update(hf_tokens_per_s=round(hf_rate, 1), ratio=round(r1_rate / hf_rate, 2))
  import jax
  result.update(params=params, sequences=_PROMPTS.value * _GROUP.value,
                new_tokens=_NEW.value, dtype=_DTYPE.value, device=jax.devices()[0].device_kind,
                machine=f"{platform.machine()} {os.cpu_count()} cores")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
