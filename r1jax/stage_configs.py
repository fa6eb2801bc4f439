"""Complete, commented config groups for the sft, rl and eval stages; experiments compose them.

Each builder returns an unlocked ConfigDict with every field the stage reads; an experiment
overrides what it needs and locks the result. Strings may hold `{workdir}`, which a pipeline
replaces with its working directory (see r1jax/pipeline.py).
"""

from __future__ import annotations

import ml_collections

from r1jax.config import grpo_group, model_group, opt_group

# The R1-Zero template's closing tag, bare and after a space: how real-size
# (byte-level BPE) tokenizers encode it in the two usual contexts.
ANSWER_STOPS = ("</answer>", " </answer>")


def _cd(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def ckpt_group(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every = 50  # steps between checkpoints (SIGTERM and the last step always save)
  c.keep = 2  # newest checkpoints kept
  c.async_save = True  # orbax writes in the background while training goes on
  c.best_metric = ""  # also keep the best step by this metric (e.g. eval/held_out/pass@1)
  c.best_mode = "max"  # max | min for best_metric
  c.update(overrides)
  return c


def eval_group(**overrides) -> ml_collections.ConfigDict:
  """R1's protocol: k samples per question at temperature 0.6, top-p 0.95."""
  e = ml_collections.ConfigDict()
  e.benchmarks = ""  # comma-separated jsonl paths ('' = none)
  e.k = 4  # samples per question (pass@1 averages them; cons@k votes)
  e.temperature = 0.6  # sampling temperature (R1: 0.6)
  e.top_p = 0.95  # nucleus (R1: 0.95)
  e.top_k = 0  # 0 = off
  e.max_new_tokens = 256  # completion budget
  e.stop = ("</answer>",)  # strings that end a completion (one or more tokens each)
  e.template = "r1_zero"  # prompt template (r1jax/tokenizer.py TEMPLATES)
  e.batch_size = 32  # prompts per sampler call
  e.limit = 0  # first N rows of each benchmark (0 = all)
  e.max_prompt_tokens = 512  # longer prompts are skipped and counted
  e.every = 0  # RL only: steps between held-out evals (0 = only at the end, if benchmarks)
  e.update(overrides)
  return e


def _common(c: ml_collections.ConfigDict, stage: str, steps: int) -> None:
  c.stage = stage  # what r1jax.main runs
  c.seed = 0  # PRNG seed for init, data order and sampling
  c.steps = steps  # optimizer steps (sft) / RL iterations (rl)
  c.tokenizer = ""  # sentencepiece .model file or HF tokenizer folder
  c.model = model_group()  # see r1jax/config.py; init_from / hf_dir pick the weights
  c.mesh = _cd(shape=(-1, 1, 1))  # (data, fsdp, tensor); one -1 fills the devices
  c.ckpt = ckpt_group()
  c.log_every = 10  # steps between console progress lines (every step goes to the JSONL)
  c.tensorboard = True  # also write TensorBoard event files


def sft_config(steps: int = 1000) -> ml_collections.ConfigDict:
  """The `sft` stage: packed next-token training (base pretraining, cold start, RS-SFT)."""
  c = ml_collections.ConfigDict()
  _common(c, "sft", steps)
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # jsonl/parquet of {"text"} or {"prompt", "completion"} rows
  c.data.batch = 16  # packed rows per step (per host)
  c.data.seq_len = 256  # tokens per packed row
  c.data.template = ""  # chat template for prompt/completion rows ('' = raw concatenation)
  c.data.epochs = 0  # passes over the data (0 = repeat until config.steps)
  c.opt = opt_group(lr=1e-3, warmup_steps=50, weight_decay=0.1)
  c.microbatches = 1  # gradient accumulation steps per update (memory only)
  return c


def rl_config(steps: int = 200) -> ml_collections.ConfigDict:
  """The `rl` stage: GRPO from rule rewards (R1-Zero and R1's reasoning RL)."""
  c = ml_collections.ConfigDict()
  _common(c, "rl", steps)
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # jsonl/parquet problems (GSM8K, MATH, AIME/AMC or generic rows)
  c.data.adapter = "auto"  # row format: auto | gsm8k | math | generic | code
  c.data.batch = 32  # prompts per RL iteration (per host); each gets grpo.group_size samples
  c.data.template = "r1_zero"  # prompt template
  c.data.max_prompt_tokens = 512  # longer prompts are skipped and counted
  c.sampler = ml_collections.ConfigDict()
  c.sampler.max_new_tokens = 1024  # completion budget T
  c.sampler.top_p = 1.0  # rollouts sample the full distribution (R1-Zero: temperature 1)
  c.sampler.top_k = 0  # 0 = off
  c.sampler.stop = ("</answer>",)  # strings that end a completion (one or more tokens each)
  c.grpo = grpo_group()
  c.opt = opt_group()
  c.rewards = _cd(
      task_field="task", default_task="math", timeout_s=10.0, fallback=0.0, num_workers=2,
      worker_memory_mb=4096,
      components=[{"name": "accuracy", "weight": 1.0, "tasks": ["math"],
                   "fields": {"gold": "gold"}},
                  {"name": "format", "weight": 1.0}])  # see r1jax/rewards/compose.py
  c.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal and refill
  c.max_refill = 2  # extra rollouts per iteration to refill dropped groups (then mask them)
  c.eval = eval_group()
  return c


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` stage: sample and grade benchmarks with a model."""
  c = ml_collections.ConfigDict()
  _common(c, "eval", 0)
  c.eval = eval_group()
  return c


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """config.tokenizer, defaulting to the HF folder the model loads from."""
  path = config.tokenizer or config.model.get("hf_dir", "")
  if not path:
    raise ValueError("set config.tokenizer (or config.model.hf_dir for an HF tokenizer)")
  return path


def r1_zero_hf(preset: str, steps: int, max_new_tokens: int, train: str,
               benchmarks: str) -> ml_collections.ConfigDict:
  """R1-Zero on an HF base model (paper hyperparameters where they apply), bf16, FSDP.

  Weights and tokenizer come from --config.model.hf_dir; data from local jsonl files.
  """
  c = rl_config(steps=steps)
  c.model = model_group(preset, param_dtype="bfloat16", compute_dtype="bfloat16",
                        remat="full")
  c.mesh.shape = (1, -1, 1)  # FSDP over every chip of the slice / GPU of the host
  c.data.train = train
  c.data.batch = 32  # questions per step (paper: 32)
  c.sampler.max_new_tokens = max_new_tokens
  # Byte-level BPE tokenizes '</answer>' differently after a space, so both forms stop a
  # rollout; a form merged with other text runs on to EOS, and the format reward sees it.
  c.sampler.stop = ANSWER_STOPS
  c.grpo.update(group_size=16, temperature=1.0, beta=0.001, eps_low=10.0, eps_high=10.0,
                mu=1, minibatches=16, loss_mode="grpo", ref_reset_every=400,
                ref_dtype="bfloat16", logits_chunk=256)  # paper: G 16, KL 0.001, eps 10
  c.opt.update(lr=3e-6, warmup_steps=10, weight_decay=0.0, grad_clip=1.0)  # paper: 3e-6
  c.rewards.num_workers = 8
  c.eval = eval_group(benchmarks=benchmarks, k=8, max_new_tokens=max_new_tokens,
                      batch_size=64, every=50, stop=ANSWER_STOPS)
  c.ckpt.update(every=25, keep=3)
  return c
