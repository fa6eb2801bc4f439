"""`generate` stage throughput vs the sampler's own, on the same prompts and batch shape.

  python tools/bench_generate.py --config=experiments/tiny_distill.py:teacher=/tmp/r1jax_zero \\
      --stage=traces --prompts=512 --workdir=/tmp/bench_generate

Takes one `generate` stage config out of an experiment (a pipeline), limits it to the first
--prompts prompts, then in one process:
1. sampler: the engine alone decodes the same batches (same prompts, batch_prompts, k, keys
   and sampling settings), each batch brought to the host and detokenised — what any use of
   the sampler costs;
2. generate: the whole stage (decode, grading in the reward pool overlapped with the next
   batch's decode, filters, selection, fsynced jsonl commits) in a fresh folder;
3. sampler again, so drift on a shared machine shows.
The first batch of each (compilation) is left out of both rates. Prints one JSON line.
"""

import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "experiment file[:arg] holding the stage config")
_STAGE = flags.DEFINE_string("stage", "traces", "name of the generate stage in the pipeline")
_PROMPTS = flags.DEFINE_integer("prompts", 512, "first N prompts (a whole number of batches)")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_generate", "scratch folder (emptied)")


def _stage_config(spec: str, stage: str, workdir: Path):
  from r1jax.stages.pipeline import resolve
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = resolve(module.get_config(arg or None)[stage], workdir).copy_and_resolve_references()
  c.unlock()
  return c


def _sampler_rate(c, prompts: list[list[int]]) -> dict:
  """Engine-only decode of the stage's batches: tokens/s over batches 2.. (1 = compile)."""
  import jax
  from r1jax.core import sharding
  from r1jax.core.tokenizer import load_tokenizer, tokenizer_path
  from r1jax.core.weights import load_model
  from r1jax.generation.engine import Engine
  mesh = sharding.make_mesh(c.mesh.shape)
  cfg, params = load_model(c.model, mesh, seed=c.seed)
  s = c.sampler
  engine = Engine(cfg, mesh, load_tokenizer(tokenizer_path(c)), temperature=s.temperature,
                  top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                  max_prompt_len=c.data.max_prompt_tokens, stop=tuple(s.stop),
                  record_top_k=c.output.top_k_logprobs)
  key, per, times, tokens = jax.random.key(c.seed), c.batch_prompts, [], []
  for b in range(len(prompts) // per):
    t0 = time.perf_counter()
    r = engine.launch(params, prompts[b * per:(b + 1) * per], jax.random.fold_in(key, b), c.k)
    samples = engine.collect(r, c.k)
    times.append(time.perf_counter() - t0)
    tokens.append(int(samples.lengths.sum()))
  return {"tokens": sum(tokens[1:]), "seconds": sum(times[1:]),
          "tokens_per_s": sum(tokens[1:]) / sum(times[1:]), "compile_batch_s": times[0]}


def main(argv):
  del argv
  from r1jax import stages
  from r1jax.core.tokenizer import load_tokenizer, tokenizer_path
  from r1jax.data.pipeline import prepare_prompts
  from r1jax.data.rows import load_rows
  from r1jax.generation.output import read_progress
  work = Path(_WORKDIR.value)
  shutil.rmtree(work, ignore_errors=True)
  c = _stage_config(_CONFIG.value, _STAGE.value, work / "pipeline")
  c.data.limit, c.progress = _PROMPTS.value, False
  rows, _ = load_rows(c.data.prompts, c.data.adapter)
  items, _ = prepare_prompts(rows[:_PROMPTS.value], load_tokenizer(tokenizer_path(c)),
                             c.data.template, c.data.max_prompt_tokens, c.data.system or None)
  prompts = [it["prompt_ids"] for it in items]
  before = _sampler_rate(c, prompts)
  t0 = time.perf_counter()
  summary = stages.run(c, str(work / "generate"))
  records = read_progress(work / "generate")[1:]
  gen_tokens = sum(r["counts"]["tokens"] for r in records)
  gen_s = sum(r["seconds"] for r in records)
  after = _sampler_rate(c, prompts)
  sampler = (before["tokens"] + after["tokens"]) / (before["seconds"] + after["seconds"])
  out = {"bench": "generate_vs_sampler", "stage": _STAGE.value, "prompts": len(prompts),
         "batch_prompts": c.batch_prompts, "k": c.k, "max_new_tokens": c.sampler.max_new_tokens,
         "sampler_tokens_per_s_before": before["tokens_per_s"],
         "sampler_tokens_per_s_after": after["tokens_per_s"],
         "generate_tokens_per_s": gen_tokens / gen_s,
         "generate_share_of_sampler": gen_tokens / gen_s / sampler,
         "same_tokens": gen_tokens == before["tokens"] == after["tokens"],
         "generate_wall_s": time.perf_counter() - t0, "accepted": summary["accepted"],
         "samples": summary["samples"], "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
         "python": sys.version.split()[0]}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
