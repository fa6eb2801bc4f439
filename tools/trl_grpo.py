"""TRL's GRPOTrainer on a bench_grpo checkpoint: the side-by-side reference of bench_grpo.py.

TRL owns its training loop, so the two engines take turns through a callback: each TRL
optimizer step (generate with HF `generate`, score, reference forward, policy forward and
backward, AdamW) is timed from `on_step_begin` to `on_step_end`, and `between(i)` (an
r1jax iteration) runs after it, outside TRL's clock. Generation and reward time are taken
from wrappers around TRL's own methods; the update is the rest of the step.

Settings follow bench_grpo's r1jax side: 8 prompts × G per step, temperature 1, no top-k /
top-p, β against a frozen reference, μ = 1, one mini-batch, lr 1e-6, f32 (`bf16=False`;
bf16 autocast with `--dtype=bfloat16`), the same reward (share of even token ids), on a
checkpoint with a word-level tokenizer (bench_common.make_random(r1_shaped=True)) so the
prompts are the same ids. Needs the `bench` extra (trl, accelerate, datasets).
"""

import os
import tempfile
import time

import numpy as np


def run(hf_dir: str, prompts: list[list[int]], group: int, completion: int, beta: float,
        dtype: str, reward_fn, iters: int, between=None, pause_s: float = 1.0) -> list[dict]:
  """`iters` TRL GRPO steps; returns their {"rollout_s", "reward_s", "update_s", "step_s",
  "useful_tokens", "padded_tokens"}. `between(i)` runs after TRL's step i, untimed."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers starts
  import datasets
  import torch
  import transformers
  import trl

  # Not AutoTokenizer: it would pick the Qwen2 BPE class from config.json.
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
  texts = [" ".join(tokenizer.convert_ids_to_tokens(list(p))) for p in prompts]
  for p, text in zip(prompts, texts):  # the word-level tokenizer gives back the same ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(p), text

  def even_share(prompts, completions, completion_ids, **_):
    ids = [np.asarray(c, np.int64) for c in completion_ids]
    tokens = np.zeros((len(ids), max(map(len, ids), default=1)), np.int64)
    mask = np.zeros(tokens.shape, bool)
    for r, c in enumerate(ids):
      tokens[r, :len(c)], mask[r, :len(c)] = c, True
    return [float(x) for x in reward_fn(tokens, mask)]

  n, width = len(prompts) * group, max(map(len, prompts))
  args = trl.GRPOConfig(
      output_dir=tempfile.mkdtemp(prefix="trl_grpo_"), use_cpu=True, bf16=dtype == "bfloat16",
      per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=group,
      steps_per_generation=1, num_iterations=1, max_completion_length=completion,
      temperature=1.0, top_p=1.0, top_k=0, beta=beta, loss_type="grpo", learning_rate=1e-6,
      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
      max_steps=iters, shuffle_dataset=False, logging_steps=10**6, save_strategy="no",
      report_to=[], seed=0, disable_dropout=True, dataloader_num_workers=0)
  # One step uses the 8 prompts once: the dataset is them, in order, once per step.
  data = datasets.Dataset.from_dict({"prompt": texts * iters})
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=even_share, args=args,
                            train_dataset=data, processing_class=tokenizer)

  clock = {"rollout_s": 0.0, "reward_s": 0.0, "useful": 0, "padded": 0}

  def timed(name, fn):
    def wrapped(*a, **k):
      t0 = time.perf_counter()
      out = fn(*a, **k)
      clock[name] += time.perf_counter() - t0
      if name == "rollout_s":  # (completion_ids, logprobs): ids cut at EOS
        lengths = [len(c) for c in out[0]]
        clock["useful"] += sum(lengths)
        # Decode ran every row to the longest; the update pads every row to the
        # longest prompt + the longest completion.
        clock["padded"] += len(lengths) * (width + max(lengths))
      return out
    return wrapped

  trainer._generate_single_turn = timed("rollout_s", trainer._generate_single_turn)
  trainer._calculate_rewards = timed("reward_s", trainer._calculate_rewards)
  rows: list[dict] = []

  class Turns(transformers.TrainerCallback):
    def on_step_begin(self, *a, **k):
      time.sleep(pause_s)  # let the other engine's idle threads go quiet
      clock.update(rollout_s=0.0, reward_s=0.0, useful=0, padded=0, t0=time.perf_counter())

    def on_step_end(self, *a, **k):
      step_s = time.perf_counter() - clock["t0"]
      rows.append({"step_s": step_s, "rollout_s": clock["rollout_s"],
                   "reward_s": clock["reward_s"],
                   "update_s": step_s - clock["rollout_s"] - clock["reward_s"],
                   "useful_tokens": clock["useful"], "padded_tokens": clock["padded"]})
      if between is not None:
        time.sleep(pause_s)
        between(len(rows) - 1)

  trainer.add_callback(Turns())
  trainer.train()
  return rows
