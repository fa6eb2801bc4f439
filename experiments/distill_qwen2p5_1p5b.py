"""Distillation: Qwen2.5-1.5B fine-tuned on R1 reasoning traces from a local jsonl (R1, stage 5).

R1 distils its reasoning into small dense models by plain SFT on ~800k of its samples
(reasoning + general); no RL on the student. The data is text, so the student may be of
another family and tokenizer than the teacher.
  python -m r1jax.main --config=experiments/distill_qwen2p5_1p5b.py \\
      --config.model.hf_dir=/data/Qwen2.5-1.5B --config.data.train=/data/r1_traces.jsonl \\
      --workdir=/data/runs/distill_1p5b --distributed
Sized for a v5e-16 (`v5e:4x4`): the update needs 55 % of a chip's HBM there
(`tools/aot_compile.py`, benchmarks/aot/).

Trace file fields (one JSON object per line; data/sft_rows.py reads each):
  {"messages": [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "<think>\\nREASONING\\n</think>\\n\\nSUMMARY"}]}
    the form of public R1 distillation sets (OpenR1-Math `messages`); an optional first
    {"role": "system"} turn is kept; the last turn (the assistant's) is the target;
  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
    the ShareGPT form (e.g. Bespoke-Stratos), read as messages;
  {"prompt": QUESTION, "completion": "<think>…</think> SUMMARY"}, e.g. r1jax's own `generate`
    output (its extra fields are ignored).
Rows are rendered with Qwen's chat format (chatml); only the assistant turn is trained on.
Bad rows are counted and logged, never fatal; a file with no usable row stops the run.
Logit distillation (distill.top_k) needs a teacher with this student's tokenizer and the
teacher's top-k logprobs in the rows (the generate stage's output.top_k_logprobs).
"""

import ml_collections

from r1jax.core.config import model_group, parse_arg
from r1jax.stages.sft import sft_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, steps=6000, seq_len=16384, batch=32)
  c = sft_config(steps=a.steps)
  c.model = model_group("qwen2.5-1.5b", param_dtype="float32",  # weights from model.hf_dir
                        compute_dtype="bfloat16", remat="full")
  c.mesh.shape = (1, -1, 1)  # FSDP over every chip of the slice / GPU of the host
  c.data.update(train="r1_traces.jsonl", batch=a.batch, seq_len=a.seq_len, template="chatml",
                epochs=2)  # packed rows of 16k tokens; 2 passes over the traces
  c.microbatches = 8  # 4 rows of 16k tokens per forward (at 4, v5e-16 needs 95 % of a chip)
  c.opt.update(lr=1e-5, warmup_steps=100, schedule="cosine", total_steps=a.steps,
               final_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0)
  c.ckpt.update(every=500, keep=2)
  c.log_every = 10  # steps between console lines
  c.lock()
  return c
