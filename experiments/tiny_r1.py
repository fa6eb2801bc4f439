"""The whole DeepSeek-R1 recipe in miniature: one resumable pipeline on a laptop CPU.

  python -m r1jax.main --config=experiments/tiny_r1.py --workdir=/tmp/r1jax_r1
  python -m r1jax.main --config=experiments/tiny_r1.py:quick --workdir=/tmp/r1q  # smoke run

Every stage starts from the one before it, as in the paper (stage names in brackets):
1. data: a synthetic world (r1jax/data/synthetic.py World): chains of 2-6 operations in equal
   shares, a fifth of the corpus's solutions worked in Chinese, some with a slipped step
   corrected ("Wait, …"), 16 % in R1-Zero's tags and a quarter worked from a line's start,
   half its prose about one thing;
   general and unsafe prompts with preference pairs (r1jax/data/scenarios.py, R1's
   readable format).
2. [base] a 0.92M Qwen2-shaped base pretrained on the corpus.
3. [zero] R1-Zero: GRPO from the base, accuracy + format rewards (language logged only).
4. [cold_start_data] R1-Zero samples on train prompts, kept when correct, well-formed, in
   English and not repetitive, rewritten in the readable format.
5. [cold_start] SFT of the base on them.
6. [reasoning] reasoning RL from the cold start: accuracy + readable format + language
   consistency. [reasoning_no_lang] the same without the language reward: its cost.
7. [rs_data] rejection sampling from the reasoning RL policy, plus general SFT rows.
8. [rs_sft] SFT of the base (not of the RL policy: the paper retrains from the base) on both.
9. [rm_helpful, rm_safety] Bradley-Terry reward models on the preference pairs; the
   helpfulness pairs also reject a boxed answer or a refusal to a general prompt, and half
   of them the chosen sentence about another thing (the topic is all that tells them apart);
   an eighth rank a detailed answer (two sentences about the thing) over one sentence, and
   an eighth that sentence over itself padded with the unsafe prompts' reason;
   half the safety pairs on unsafe prompts reject a harmless misreading, not compliance.
10. [r1] all-scenario RL from rs_sft: rule rewards on math, the RMs on general / unsafe,
    DAPO's overlong penalty on every row; prompts 0.4 math, 0.4 general, 0.2 unsafe.
11. [distill_data, student_base, student_distill] R1's filtered traces; a 0.44M student
    pretrained on the same corpus, then fine-tuned on the traces.
12. [student_rl] the same student base trained by RL alone (R1-Zero's recipe): the control.
13. [eval_*, mix_*] every model on the held-out arithmetic (k = 4, T = 0.6, top-p 0.95) and
    on held-out general / unsafe prompts (helpfulness RM score; on-topic, detailed and
    refusal rates by rule), then
    WORKDIR/report.md: the table, the eight claims computed with their thresholds
    (r1jax/stages/r1_report.py), curves.
Stable RL, by the recipe: every RL stage decays its learning rate (cosine to 10 %); each
stage's summary.json reports its worst mid-run held-out drop, and so does the report.
Re-running the command resumes: finished stages are skipped, a killed one resumes.
"""

import copy
import functools
import importlib.util
import pathlib

import ml_collections

from r1jax.core.config import eval_group, model_group, parse_arg
from r1jax.stages.eval import eval_config
from r1jax.stages.generate import generate_config
from r1jax.stages.rl import rl_config
from r1jax.stages.sft import sft_config

POLICY = dict(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
              mlp_dim=384, max_position=512, tie_embeddings=True)  # tiny_zero's model
STUDENT = dict(vocab_size=512, hidden=96, layers=4, heads=3, kv_heads=1, head_dim=32,
               mlp_dim=256, max_position=512, tie_embeddings=True)  # tiny_distill's student
# SFT's packed 256-token rows attend in query blocks of 64, each over the keys its documents
# can see (remat: the backward recomputes the forward): the same math, an SFT step 16 %
# faster on XLA:CPU (tools/bench_sft_blocks.py; the blocks give it, remat neither helps nor
# costs). Not in RL: its rows hold one shared prompt, the blocks see nearly every key, and
# each of a stage's ~6 packed shapes compiled 3-5 s longer for a 2-5 % faster update
# (benchmarks/tiny_r1/README.md).
SFT_UPDATE = dict(attention_block=64, remat="full")
SAMPLING = dict(temperature=0.6, top_p=0.95)  # R1's evaluation protocol, for data and evals
NEW_TOKENS = 112  # completion budget everywhere: a 6-step chain with a correction fits
PROMPT_TOKENS = 128
ZERO_STOPS = ("</answer>",)  # R1-Zero's format ends there; the readable one at EOS
# The models of the report's table: (row, eval stage suffix, model, format it was taught).
MODELS = (("base", "base", "zero"), ("R1-Zero", "zero", "zero"),
          ("cold start", "cold_start", "readable"), ("reasoning RL", "reasoning", "readable"),
          ("reasoning RL, no language reward", "reasoning_no_lang", "readable"),
          ("RS-SFT", "rs_sft", "readable"), ("R1", "r1", "readable"),
          ("distilled student", "student_distill", "readable"),
          ("RL-only student", "student_rl", "zero"))
_STUDENTS = ("student_base", "student_distill", "student_rl")


def _format(fmt: str, weight: float | None = None) -> dict:
  """The strict format reward of R1-Zero's tags, or of R1's `<think>…</think> summary`."""
  out = {"name": "format", "kwargs": {} if fmt == "zero" else {"require_answer_tag": False}}
  return out if weight is None else {**out, "weight": weight}


def _sft(init: str, train: str, steps: int, model: dict, seed: int, *, lr: float,
         warmup: int = 20, blocks: bool = True) -> ml_collections.ConfigDict:
  """Packed SFT. Template "": corpus rows are text, and sampled / scenario rows carry their
  prompts already rendered with the R1-Zero template. `blocks`: SFT_UPDATE's query blocks."""
  s = sft_config(steps=steps)
  s.seed = seed
  s.tokenizer = "{workdir}/data/tokenizer.model"
  s.model = model_group(**model, **(SFT_UPDATE if blocks else {}))
  s.model.init_from = init
  s.data.update(train=train, batch=16, seq_len=256, template="")
  s.opt.update(lr=lr, warmup_steps=min(warmup, steps // 4), schedule="cosine", total_steps=steps,
               final_lr_ratio=0.1, weight_decay=0.1)
  s.ckpt.every, s.log_every, s.tensorboard = 100, 50, False
  return s


def _rl(init: str, steps: int, model: dict, seed: int, fmt: str, language: float, *,
        every: int, lr: float = 1e-4) -> ml_collections.ConfigDict:
  """GRPO on the arithmetic train prompts: R1-Zero's recipe (fmt "zero", language logged,
  weight 0) or reasoning RL's (fmt "readable", with the language reward). 1e-4 from a base:
  at 2e-4 seed 1's R1-Zero fell 23 points mid-run and the RL-only student collapsed."""
  r = rl_config(steps=steps)
  r.seed = seed
  r.tokenizer = "{workdir}/data/tokenizer.model"
  r.model = model_group(**model)
  r.model.init_from = init
  r.data.update(train="{workdir}/data/rl_train.jsonl", batch=8, max_prompt_tokens=PROMPT_TOKENS)
  r.sampler.update(max_new_tokens=NEW_TOKENS, stop=ZERO_STOPS if fmt == "zero" else ())
  r.grpo.update(group_size=8, beta=0.0, eps_low=0.2, eps_high=0.28, loss_mode="bnpo",
                share_prompts=True)  # one copy of the ~100-token prompt: R1-Zero updates -22 %
  r.opt.update(lr=lr, warmup_steps=min(5, steps // 4), grad_clip=1.0, schedule="cosine",
               total_steps=steps, final_lr_ratio=0.1)  # the decay keeps the curves stable
  r.rewards.components = [{"name": "accuracy", "weight": 1.0, "tasks": ["math"]},
                          _format(fmt, 0.5),
                          {"name": "language", "weight": language, "kwargs": {"lang": "en"}}]
  r.rewards.num_workers = 1
  r.eval = _eval_group(fmt, every)
  r.ckpt.every, r.log_every, r.tensorboard = 50, 10, False
  return r


def _eval_group(fmt: str, every: int = 0) -> ml_collections.ConfigDict:
  return eval_group(benchmarks="{workdir}/data/held_out.jsonl", k=4, max_new_tokens=NEW_TOKENS,
                    batch_size=64, max_prompt_tokens=PROMPT_TOKENS,
                    stop=ZERO_STOPS if fmt == "zero" else (), every=every, **SAMPLING)


def _generate(init: str, seed: int, *, prompts: str, limit: int, fmt: str, readable: bool,
              rewards: dict | None = None) -> ml_collections.ConfigDict:
  """Sampling k = 4 per prompt at R1's settings. With `rewards` (the mixture evals), every
  sample is kept and scored; else the data filters: correct, well-formed, English (≥ 95 % of
  the reasoning's words), not truncated, no 8-gram loop; one sample per prompt."""
  g = generate_config()
  g.seed = seed
  g.tokenizer = "{workdir}/data/tokenizer.model"
  g.model = model_group(**(STUDENT if "student" in init else POLICY))
  g.model.init_from = init
  g.data.update(prompts=prompts, max_prompt_tokens=PROMPT_TOKENS, limit=limit)
  g.sampler.update(max_new_tokens=NEW_TOKENS, stop=ZERO_STOPS if fmt == "zero" else (),
                   **SAMPLING)
  g.k, g.batch_prompts = 4, 16
  g.rewards.num_workers = 1
  g.tensorboard = False
  if rewards is not None:
    g.rewards = ml_collections.ConfigDict(copy.deepcopy(rewards))
    g.filters.update(verifier="", structure="", truncated=False)
    g.select.update(per_prompt=0, order="first")
    return g
  g.filters.update(verifier="accuracy", structure="readable" if readable else fmt,
                   truncated=True, language="en",
                   min_language=0.95, repetition_ngram=8, repetition_max=3)
  g.select.update(per_prompt=1, order="first")
  g.output.readable = readable
  return g


def _reward_model(name: str, steps: int, seed: int) -> ml_collections.ConfigDict:
  """experiments/tiny_all_scenario.py's RM recipe, on this world's pairs."""
  spec = importlib.util.spec_from_file_location(
      "tiny_all_scenario", pathlib.Path(__file__).with_name("tiny_all_scenario.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  m = getattr(module, "_reward_model")("{workdir}/data/tokenizer.model", name, steps)
  m.seed = seed
  return m


def _mixture_rewards() -> dict:
  """All-scenario RL's reward spec (experiments/tiny_all_scenario.py's in the readable
  format, plus DAPO's overlong penalty): rule rewards on math, the helpfulness RM on general
  summaries, the safety RM on every whole response, the format reward and the overlong
  penalty on every row. The mix_* evals score every model with it too."""
  rm = lambda name, view: {"name": name, "path": f"{{workdir}}/rm_{name}/reward_model",
                           "tokenizer": "{workdir}/data/tokenizer.model", "template": "plain",
                           "view": view, "max_len": 96, "batch_size": 64, "norm": "validation"}
  return dict(
      task_field="task", default_task="math", num_workers=1, timeout_s=10.0, fallback=0.0,
      models=[rm("helpful", "summary"), rm("safety", "full")],
      components=[{"name": "accuracy"}, _format("readable"),
                  {"name": "language", "kwargs": {"lang": "en"}},
                  {"name": "helpful", "fields": {"prompt": "question"}},
                  {"name": "safety", "fields": {"prompt": "question"}},
                  # DAPO's soft overlong punishment, past 104 of the 112 tokens (R1's longest
                  # filtered traces have 97): a truncated response scores -1. Without it seed
                  # 0's R1 at 200 steps answered unsafe prompts with a refusal looping to the
                  # budget ("I will not help with that, it will not help with that, …"), which
                  # the safety RM scored as a refusal
                  {"name": "overlong", "fields": {"length": "num_tokens"},
                   "kwargs": {"max_len": NEW_TOKENS, "cache_len": 8}}],
      by_task={"math": {"accuracy": 1.0, "format": 0.5, "language": 0.5, "safety": 0.5,
                        "overlong": 1.0},
               "general": {"helpful": 1.0, "safety": 0.5, "format": 0.5, "overlong": 1.0},
               "unsafe": {"safety": 1.0, "format": 0.5, "overlong": 1.0}})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # helpful_rm_steps: at 800 the RM ranked held-out pairs with an off-topic rejected answer
  # right 94.8 % (seed 0) and 69.7 % (seed 1): topic is learnt slowly, so twice the steps
  a = parse_arg(arg, quick=False, seed=0, base_steps=1200, zero_steps=200, cold_steps=120,
                reasoning_steps=80, rs_steps=300, rm_steps=400, helpful_rm_steps=1600,
                r1_steps=200, student_steps=800, distill_steps=300, student_rl_steps=150)
  q, seed = a.quick, a.seed
  steps = {k: a[k] for k in a if k.endswith("_steps")}
  if q:
    # a smoke run: every stage's code, not its results (10 min 4 s with base_steps=250 and
    # student_steps=60 on a slow hour of the 2-core CPU, against a 10-minute budget; 10 min
    # 19 s with SFT's query blocks, which quick now leaves out: 8 min 16 s at 2c11ae2)
    steps = dict(base_steps=150, zero_steps=12, cold_steps=12, reasoning_steps=6, rs_steps=20,
                 rm_steps=30, helpful_rm_steps=30, r1_steps=4, student_steps=40,
                 distill_steps=20, student_rl_steps=12)
  # held-out evals during RL (the curves of claims 2, 3 and 5), every 50 steps in R1-Zero
  # and 40 in reasoning RL (was 25: each eval is ~11 s, and R1-Zero's 9 were 105 s)
  every = 0 if q else 50
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"  # the stages of c.order in turn, then the R1 report
  c.seed = seed  # seeds the world and every stage
  c.allow_changes = ""  # fields a re-run may change in a stage that ran

  c.synthetic = ml_collections.ConfigDict(dict(  # the arithmetic world
      corpus_docs=20000 if q else 120000, train_problems=2000 if q else 4000,
      held_out_problems=64 if q else 300, vocab_size=POLICY["vocab_size"],
      # tags / newline: the base has worked in R1-Zero's tags and after "<think>\n" often
      # enough to copy and add there as well as elsewhere (a 2nd seed's cold start did not)
      # topical: half the prose stays on one thing, so the base can echo what a general
      # prompt asks about (RS-SFT from a base without it named the right thing 3.6 % of times)
      world=dict(min_ops=2, max_ops=3 if q else 6, second_language=0.2, self_check=0.15,
                 tags=0.16, newline=0.25, topical=0.5)))
  c.scenarios = ml_collections.ConfigDict(dict(  # r1jax/data/scenarios.py, readable format
      sft_math=0, sft_general=600, sft_unsafe=600, pairs=4000, eval_pairs=512, rl_math=400,
      rl_general=400, rl_unsafe=200, held_out_math=0, fmt="readable", sft_template="r1_zero",
      # R1's non-reasoning SFT data is curated (DeepSeek-V3's): 4 in 5 general demos helpful,
      # 1 in 5 of those detailed (a second sentence about the thing)
      sft_helpful_share=0.8, sft_detailed_share=0.2,
      # a quarter of the helpfulness pairs rank a detailed answer over the sentence it
      # extends, or (half of them) that sentence over itself padded with the unsafe prompts'
      # reason. On topic alone, RS-SFT answered 98 % of general prompts as well as the RM
      # could tell, and R1 had nothing to raise (seed 0: +0.00 z); without the padded pairs
      # R1 appended "That would hurt someone." to its answers (+1.30 z, 8 % detailed)
      helpful_detailed=0.25,
      # the helpfulness RM also rejects what reasoning policies answer a general prompt with
      helpful_off_topic=("math", "refusal"),
      # half its pairs differ in the topic alone: an RM that ignores the prompt scored every
      # general answer alike (51 % on off-topic sentences), so RL had nothing to raise
      helpful_swapped=0.5,
      # half the safety RM's unsafe pairs reject a harmless misreading ("The user asks about
      # the notes." and a sentence about them): ranked with refusals before, it let seed 1's
      # R1 trade refusals for it (20.7 -> 5.3 %)
      safety_deflection=0.5,
      # a quarter of the others reject the refusal's opening with a sentence about the thing
      # for its reason: without them, a fresh seed 0 on another CPU answered 207 of 208 unsafe
      # prompts "I will not help with that, it wouldent asks about the notes again." and the
      # like, which the safety RM scored above the refusal (refusals by rule 16.8 -> 3.4 %);
      # with them, re-run from RS-SFT, 208 of 208 refused (16.8 -> 100 %)
      safety_broken_reason=0.25))

  corpus, train = "{workdir}/data/corpus.jsonl", "{workdir}/data/rl_train.jsonl"
  base, student = "{workdir}/base/final", "{workdir}/student_base/final"
  samples = lambda stage: f"{{workdir}}/{stage}/samples-h00000.jsonl"
  n = 128 if q else 2000  # prompts sampled for each data stage
  sft = functools.partial(_sft, seed=seed, blocks=not q)  # quick: a block compiles longer
  c.base = sft("", corpus, steps["base_steps"], POLICY, lr=2e-3, warmup=50)  # 2.
  c.zero = _rl(base, steps["zero_steps"], POLICY, seed, "zero", 0.0, every=every)  # 3.
  c.cold_start_data = _generate("{workdir}/zero/final", seed, prompts=train,  # 4.
                                limit=128 if q else 1500, fmt="zero", readable=True)
  c.cold_start = sft(base, samples("cold_start_data"), steps["cold_steps"], POLICY,  # 5.
                     lr=5e-4)
  for name, language in (("reasoning", 0.5), ("reasoning_no_lang", 0.0)):  # 6.
    c[name] = _rl("{workdir}/cold_start/final", steps["reasoning_steps"], POLICY, seed,
                  "readable", language, every=every * 4 // 5 * (1 if language else 2),
                  lr=5e-5)  # from SFT: gentler than from the base; no_lang's evals: a drop only
  c.rs_data = _generate("{workdir}/reasoning/final", seed, prompts=train, limit=n,  # 7.
                        fmt="readable", readable=False)
  c.rs_sft = sft(base, samples("rs_data") + ",{workdir}/scenarios/sft.jsonl",  # 8.
                 steps["rs_steps"], POLICY, lr=5e-4)
  c.rm_helpful = _reward_model("helpful", steps["helpful_rm_steps"], seed)  # 9.
  c.rm_safety = _reward_model("safety", steps["rm_steps"], seed)  # 9.
  r = _rl("{workdir}/rs_sft/final", steps["r1_steps"], POLICY, seed, "readable", 0.5,
          every=2 * every, lr=2.5e-5)  # at 5e-5 seed 0 lost 0.8 points of pass@1
  r.data.update(train="{workdir}/scenarios/rl_mix.jsonl")
  # 200 steps (from 100): at 100 steps, seed 0's R1 gained +0.09 z of helpfulness, and seed
  # 1's, refusing more once the safety RM asked it to, +0.20 ± 0.14. The batch mix is the
  # prompt file's (scenarios rl_math / rl_general / rl_unsafe); task_weights checks it, and
  # a share 0.05 off fails. (It read 0.4 / 0.35 / 0.25 in earlier runs, which trained on the
  # file's mix all the same: the check then only warned, past 0.1 of a share.) General 0.4
  # (from 0.25): on seed 0's last run, re-run from RS-SFT, helpfulness +0.05 z (from +0.00)
  # and pass@1 -0.3 ± 0.2 points (from -0.7 ± 0.4).
  r.data.task_weights = ml_collections.ConfigDict(dict(math=0.4, general=0.4, unsafe=0.2))
  r.grpo.update(temperature=0.7, beta=0.04)  # R1 stage 4; KL to the RS-SFT start
  r.rewards = ml_collections.ConfigDict(_mixture_rewards())
  c.r1 = r  # 10. all-scenario RL: "R1"
  c.distill_data = _generate("{workdir}/r1/final", seed, prompts=train, limit=n,  # 11.
                             fmt="readable", readable=False)
  c.student_base = sft("", corpus, steps["student_steps"], STUDENT, lr=2e-3, warmup=50)  # 11.
  c.student_distill = sft(student, samples("distill_data"), steps["distill_steps"],  # 11.
                          STUDENT, lr=5e-4)
  c.student_rl = _rl(student, steps["student_rl_steps"], STUDENT, seed, "zero", 0.0,  # 12.
                     every=2 * every)  # its curve feeds no claim, only the worst drop
  order = ["base", "zero", "cold_start_data", "cold_start", "reasoning", "reasoning_no_lang",
           "rs_data", "rs_sft", "rm_helpful", "rm_safety", "r1", "distill_data",
           "student_base", "student_distill", "student_rl"]
  held_mix = "{workdir}/scenarios/held_out_mix.jsonl"
  for _, name, fmt in (("", "base", "zero"),) + tuple(m for m in MODELS if m[1] != "base"):
    init = f"{{workdir}}/{name}/final"
    e = eval_config()
    e.seed = seed
    e.tokenizer = "{workdir}/data/tokenizer.model"
    e.model = model_group(**(STUDENT if name in _STUDENTS else POLICY))
    e.model.init_from = init
    e.eval = _eval_group(fmt)
    e.tensorboard = False
    c[f"eval_{name}"] = e  # held-out arithmetic, k = 4, the same key for every model
    # held-out general and unsafe prompts, scored by both RMs
    c[f"mix_{name}"] = _generate(init, seed, prompts=held_mix, limit=0, fmt=fmt, readable=False,
                                 rewards=_mixture_rewards())
    order += [f"eval_{name}", f"mix_{name}"]
  if q:  # a smoke run: its weak models rarely pass R1's data filters, so none is applied
    for name in ("cold_start_data", "rs_data", "distill_data"):
      c[name].filters.update(verifier="", structure="", language="", truncated=False,
                             repetition_ngram=0)
      c[name].output.readable = False
  c.order = tuple(order)  # run order
  c.report = ml_collections.ConfigDict(dict(  # 13. the report
      kind="r1",  # r1jax/stages/r1_report.py: table, claims, curves
      models=[list(m) for m in MODELS]))
  c.lock()
  return c
