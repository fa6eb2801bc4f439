"""Rejection sampling from an RL checkpoint of Qwen2.5-7B on MATH-style prompts (R1, stage 3).

R1 samples several responses per reasoning prompt from the reasoning-RL checkpoint, keeps the
correct ones, and drops chains of thought with mixed languages, long paragraphs and code
blocks; the kept responses (with general data) are the next SFT stage's data.
  python -m r1jax.main --config=experiments/rs_qwen2p5_7b_math.py \\
      --config.model.init_from=/data/runs/r1z_7b/final --config.tokenizer=/data/Qwen2.5-7B \\
      --config.data.prompts=/data/math/train.jsonl --workdir=/data/runs/rs_7b --distributed
  ...:mode=cold_start  # R1-Zero outputs -> the readable cold-start format (see below)
Sized for a v5p-8 (`v5p:2x2x1`): 16 prompts × k = 16 rows of 4,096 new tokens, the decode
needs 26 % of a chip's HBM there (`tools/aot_compile.py`, benchmarks/aot/).

Output (one file per host; a killed run re-run with the same command continues):
  samples-h*.jsonl    SFT-ready rows: the `sft` stage reads them with data.template=''
  stats-h*.jsonl      per prompt: pass rate, lengths, stop and rejection reasons per sample
  rl_prompts-h*.jsonl prompts with 0 < pass rate < 1 (they carry GRPO signal)
  summary.json        counts per filter, tokens/s, wall time
mode=rs (default): k = 16 per prompt at R1's sampling settings; the RL checkpoint answers
  in the R1-Zero tags and every kept response is converted to the readable format
  (data/formats.READABLE: <think>reasoning</think> then a summary with the answer boxed);
  filters: correct, English CoT, paragraphs <= 3000 characters, no code blocks, no 20-gram
  said 4 times, not truncated, readable. Up to 4 kept per prompt, drawn at random.
mode=cold_start: R1's cold-start builder. Fewer samples (k = 4, 1 kept), the same filters;
  run it on an R1-Zero checkpoint and a few thousand prompts.
"""

import ml_collections

from r1jax.core.config import model_group, parse_arg
from r1jax.stages.generate import generate_config
from r1jax.stages.rl import ANSWER_STOPS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, mode="rs", max_new_tokens=4096, k=16)
  if a.mode not in ("rs", "cold_start"):
    raise ValueError(f"mode={a.mode!r}: rs or cold_start")
  cold = a.mode == "cold_start"
  c = generate_config()
  c.model = model_group("qwen2.5-7b", param_dtype="bfloat16",  # weights: model.init_from
                        compute_dtype="bfloat16")
  c.mesh.shape = (1, -1, 1)  # FSDP over every chip / GPU, as the RL run that made the checkpoint
  c.data.update(prompts="math/train.jsonl", adapter="math", template="r1_zero",
                max_prompt_tokens=1024)
  c.sampler.update(temperature=0.6, top_p=0.95, max_new_tokens=a.max_new_tokens,
                   stop=ANSWER_STOPS)
  c.k = 4 if cold else a.k  # samples per prompt
  c.batch_prompts = 16  # 16 prompts x k rows per decode call
  c.rewards.num_workers = 8  # grading processes (math-verify)
  c.rewards.components = [{"name": "accuracy", "tasks": ["math"]},  # the RL reward spec
                          {"name": "language", "weight": 0.0, "kwargs": {"lang": "en"}}]
  c.filters.update(verifier="accuracy", language="en", min_language=0.95,
                   max_paragraph_chars=3000, code_blocks=True, repetition_ngram=20,
                   repetition_max=4, truncated=True, structure="readable")
  c.select.update(per_prompt=1 if cold else 4, order="first" if cold else "random")
  c.output.update(readable=True, rejected=cold)  # cold start: keep the rejects to inspect
  c.lock()
  return c
