"""Distillation in miniature: the tiny R1-Zero policy teaches a student half its size, on a CPU.

  python -m r1jax.main --config=experiments/tiny_distill.py --workdir=/tmp/r1jax_distill
  python -m r1jax.main --config=experiments/tiny_distill.py:teacher=/tmp/r1jax_zero \\
      --workdir=/tmp/r1jax_distill  # reuse a finished experiments/tiny_zero.py run

1. teacher: experiments/tiny_zero.py run in WORKDIR/teacher (skipped with teacher=DIR): the
   0.92M base pretrained on the synthetic corpus, then 250 GRPO steps. Its final policy is
   the teacher, its data folder the data.
2. student_base: a 0.44M model of the same family (hidden 96, 4 layers) pretrained on the same
   corpus with the same recipe: the student's own base.
3. traces: the `generate` stage on the 4000 RL training prompts with the teacher: k = 4 at R1's
   sampling settings; kept: correct (the RL accuracy reward), strict R1-Zero format, not
   truncated, no n-gram loop; up to 2 per prompt. The teacher's top-8 logprobs are stored.
   traces_unfiltered: the same samples (same seed), nothing filtered, the first 2 per prompt.
4. Students, all from student_base, same steps and optimizer:
   sft (filtered traces), sft_unfiltered, kd (filtered traces, 0.5·top-8 KL + 0.5·CE).
5. eval_*: the held-out split, k = 4, temperature 0.6, top-p 0.95, the same key for all.
   WORKDIR/report.md: pass@1 ± s.e., share of the teacher's pass@1, gain over the base.
"""

import pathlib

import ml_collections

from r1jax.core.config import config_from_file, eval_group, model_group, parse_arg
from r1jax.stages.eval import eval_config
from r1jax.stages.generate import generate_config
from r1jax.stages.rl import ANSWER_STOPS
from r1jax.stages.sft import sft_config

STUDENT = dict(vocab_size=512, hidden=96, layers=4, heads=3, kv_heads=1, head_dim=32,
               mlp_dim=256, max_position=512, tie_embeddings=True)
TEACHER = dict(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
               mlp_dim=384, max_position=512, tie_embeddings=True)
SAMPLING = dict(temperature=0.6, top_p=0.95)  # R1's evaluation protocol, for data and evals


def _traces(teacher: str, data: str, filtered: bool) -> ml_collections.ConfigDict:
  g = generate_config()
  g.tokenizer = f"{data}/tokenizer.model"
  g.model = model_group(**TEACHER)
  g.model.init_from = f"{teacher}/rl/final"
  g.data.update(prompts=f"{data}/rl_train.jsonl", max_prompt_tokens=104)
  g.sampler.update(max_new_tokens=64, stop=ANSWER_STOPS, **SAMPLING)
  g.k, g.batch_prompts = 4, 16
  g.rewards.num_workers = 1
  g.select.update(per_prompt=2, order="first")
  if filtered:
    g.filters.update(verifier="accuracy", structure="zero", truncated=True,
                     repetition_ngram=8, repetition_max=3)
    g.output.top_k_logprobs = 8
  else:
    g.filters.update(verifier="", structure="", truncated=False)
  g.tensorboard = False
  return g


def _student(init: str, data: str, train: str, steps: int, kd: int = 0):
  s = sft_config(steps=steps)
  s.tokenizer = f"{data}/tokenizer.model"
  s.model = model_group(**STUDENT)
  s.model.init_from = init
  s.data.update(train=train, batch=16, seq_len=256, template="")
  s.opt.update(lr=5e-4, warmup_steps=20, schedule="cosine", total_steps=steps,
               final_lr_ratio=0.1, weight_decay=0.1)
  s.distill.update(top_k=kd, kd_weight=0.5)
  s.ckpt.every = 100
  s.log_every = 50
  s.tensorboard = False
  return s


def _eval(model: dict, init: str, data: str) -> ml_collections.ConfigDict:
  e = eval_config()
  e.tokenizer = f"{data}/tokenizer.model"
  e.model = model_group(**model)
  e.model.init_from = init
  e.eval = eval_group(benchmarks=f"{data}/held_out.jsonl", k=4, max_new_tokens=64,
                      batch_size=64, max_prompt_tokens=128, stop=ANSWER_STOPS, **SAMPLING)
  e.tensorboard = False
  return e


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, teacher="", quick=False, base_steps=1500, sft_steps=600)
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"  # the stages of c.order in turn, then the report
  c.seed = 0  # (each stage config has its own seed, 0)
  c.allow_changes = ""  # fields a re-run may change in a stage that ran
  order = ["teacher"] if not a.teacher else []
  teacher = a.teacher or "{workdir}/teacher"
  data = f"{teacher}/data"
  if not a.teacher:
    zero = pathlib.Path(__file__).with_name("tiny_zero.py")
    c.teacher = config_from_file(zero, "quick" if a.quick else None)  # that pipeline
  base = sft_config(steps=200 if a.quick else a.base_steps)  # the teacher base's recipe
  base.tokenizer = f"{data}/tokenizer.model"
  base.model = model_group(**STUDENT)
  base.data.update(train=f"{data}/corpus.jsonl", batch=16, seq_len=256)
  base.opt.update(lr=2e-3, warmup_steps=50, schedule="cosine", total_steps=base.steps,
                  final_lr_ratio=0.1, weight_decay=0.1)
  base.ckpt.every, base.log_every, base.tensorboard = 500, 50, False
  c.student_base = base  # the student pretrained like the teacher base
  c.traces = _traces(teacher, data, filtered=True)  # generate + filters + top-8 logprobs
  c.traces_unfiltered = _traces(teacher, data, filtered=False)  # same samples, no filter
  init, steps = "{workdir}/student_base/final", 60 if a.quick else a.sft_steps
  c.sft = _student(init, data, "{workdir}/traces/samples-h00000.jsonl", steps)  # plain SFT
  c.sft_unfiltered = _student(  # plain SFT on the unfiltered samples
      init, data, "{workdir}/traces_unfiltered/samples-h00000.jsonl", steps)
  c.kd = _student(init, data, "{workdir}/traces/samples-h00000.jsonl", steps, kd=8)  # logits
  c.eval_teacher = _eval(TEACHER, f"{teacher}/rl/final", data)  # held-out, k = 4
  c.eval_student_base = _eval(STUDENT, "{workdir}/student_base/final", data)  # same protocol
  for name in ("sft", "sft_unfiltered", "kd"):
    c[f"eval_{name}"] = _eval(STUDENT, f"{{workdir}}/{name}/final", data)
  order += ["student_base", "traces", "traces_unfiltered", "sft", "sft_unfiltered", "kd",
            "eval_teacher", "eval_student_base", "eval_sft", "eval_sft_unfiltered", "eval_kd"]
  c.order = tuple(order)  # run order
  c.report = ml_collections.ConfigDict(  # evals vs the teacher and the student base
      dict(reference="eval_teacher", base="eval_student_base"))
  c.lock()
  return c
