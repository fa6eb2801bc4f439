"""All-scenario RL in miniature (R1 stage 4): one GRPO run over math, general and unsafe
prompts, judged by rule rewards, a helpfulness RM and a safety RM, on a CPU.

  python -m r1jax.main --config=experiments/tiny_all_scenario.py:teacher=/tmp/r1jax_zero \\
      --workdir=/tmp/r1jax_all  # on a finished experiments/tiny_zero.py run
  python -m r1jax.main --config=experiments/tiny_all_scenario.py --workdir=/tmp/r1jax_all

1. teacher: experiments/tiny_zero.py in WORKDIR/teacher (skipped with teacher=DIR): the
   R1-Zero policy and its data.
2. scenarios (r1jax/data/scenarios.py): general prompts ("Describe the lesson") and unsafe
   ones ("Help me steal the notes") in the corpus's words, preference pairs for two reward
   models, stage-3 SFT rows, the RL mixture and held-out prompts of every type.
3. rm_helpful, rm_safety: tiny Bradley–Terry RMs trained by the `reward_model` stage; each
   saves its held-out pairwise accuracy and score mean / std (norm.json).
4. sft: R1's stage-3 SFT in miniature, from the R1-Zero policy: worked arithmetic (a quarter
   with Chinese connectives: language mixing) and general / unsafe demonstrations of mixed
   quality (half the general answers on topic, 30% of unsafe prompts refused).
5. rl: all-scenario GRPO from sft at temperature 0.7. Rewards routed by task: math gets
   accuracy, format, language consistency and safety; general gets helpfulness (on the
   summary after </think>) and safety; unsafe gets safety (on the whole response). Each RM's
   score is put on the rule scale by its validation mean / std. rl_no_lang: the same with
   the language reward's weight 0 (still logged), so its cost is visible. Guards (the
   default; `guards=False` drops them): the format reward on general and unsafe rows too,
   and a KL penalty (β = 0.04) to the SFT start. Without them the policy games the tiny RMs
   with malformed text. The RL learning rate is rl_lr (5e-5; tiny_zero's 2e-4 made both
   runs unstable on this mixture). All three settings: benchmarks/all_scenario/.
6. eval_*: held-out arithmetic pass@1 (k = 4) of the start (sft), both RL runs and the teacher.
   rewards_*: the held-out mixture sampled k = 4 at temperature 0.7 and scored by the same
   reward spec. WORKDIR/report.md: pass@1, each task's rewards before and after, RM accuracy.
"""

import copy
import pathlib

import ml_collections

from r1jax.core.config import config_from_file, eval_group, model_group, parse_arg
from r1jax.stages.eval import eval_config
from r1jax.stages.generate import generate_config
from r1jax.stages.reward_model import reward_model_config
from r1jax.stages.rl import ANSWER_STOPS, rl_config
from r1jax.stages.sft import sft_config

POLICY = dict(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
              mlp_dim=384, max_position=512, tie_embeddings=True)  # tiny_zero's model
RM = dict(vocab_size=512, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, mlp_dim=192,
          max_position=512, tie_embeddings=True)
TEMPERATURE = 0.7  # R1 stage 4 rollouts, and the reward evals


def _reward_model(tok: str, name: str, steps: int) -> ml_collections.ConfigDict:
  m = reward_model_config(steps=steps)
  m.tokenizer = tok
  m.model = model_group(**RM)
  m.data.update(train=f"{{workdir}}/scenarios/{name}_train.jsonl",
                eval=f"{{workdir}}/scenarios/{name}_eval.jsonl", template="plain",
                max_len=96, batch=32)
  m.opt.update(lr=3e-3, warmup_steps=20, grad_clip=1.0)
  m.eval_every, m.log_every, m.ckpt.every, m.tensorboard = 100, 50, 100, False
  return m


def _rewards(tok: str, language: float, guards: bool) -> dict:
  """The reward spec: rule rewards, the two RMs (declared, loaded on the policy's mesh) and
  the routing by task. `guards` adds the format reward to general and unsafe rows."""
  guard = {"format": 0.5} if guards else {}
  rm = lambda name, view: {"name": name, "path": f"{{workdir}}/rm_{name}/reward_model",
                           "tokenizer": tok, "template": "plain", "view": view, "max_len": 96,
                           "batch_size": 64, "norm": "validation"}
  return dict(
      task_field="task", default_task="math", num_workers=1, timeout_s=10.0, fallback=0.0,
      models=[rm("helpful", "summary"), rm("safety", "full")],
      components=[{"name": "accuracy"}, {"name": "format"},
                  {"name": "language", "kwargs": {"lang": "en"}},
                  {"name": "helpful", "fields": {"prompt": "question"}},
                  {"name": "safety", "fields": {"prompt": "question"}}],
      by_task={"math": {"accuracy": 1.0, "format": 0.5, "language": language, "safety": 0.5},
               "general": {"helpful": 1.0, "safety": 0.5, **guard},
               "unsafe": {"safety": 1.0, **guard}})


def _rl(tok: str, steps: int, language: float, guards: bool,
        lr: float) -> ml_collections.ConfigDict:
  r = rl_config(steps=steps)
  r.tokenizer = tok
  r.model = model_group(**POLICY)
  r.model.init_from = "{workdir}/sft/final"
  r.data.update(train="{workdir}/scenarios/rl_mix.jsonl", batch=8, max_prompt_tokens=128)
  r.data.task_weights = ml_collections.ConfigDict(dict(math=0.5, general=0.25, unsafe=0.25))
  r.sampler.max_new_tokens = 80
  r.grpo.update(group_size=8, temperature=TEMPERATURE, beta=0.04 if guards else 0.0,
                eps_low=0.2, eps_high=0.28, loss_mode="bnpo")  # β: KL to the SFT start
  r.opt.update(lr=lr, warmup_steps=5, grad_clip=1.0)
  r.rewards = ml_collections.ConfigDict(_rewards(tok, language, guards))
  r.ckpt.every, r.log_every, r.tensorboard = 50, 10, False
  return r


def _rewards_eval(tok: str, init: str, rewards: ml_collections.ConfigDict):
  g = generate_config()
  g.tokenizer = tok
  g.model = model_group(**POLICY)
  g.model.init_from = init
  g.data.update(prompts="{workdir}/scenarios/held_out_mix.jsonl", max_prompt_tokens=128)
  g.sampler.update(max_new_tokens=80, stop=ANSWER_STOPS, temperature=TEMPERATURE, top_p=1.0)
  g.k, g.batch_prompts = 4, 16
  g.rewards = copy.deepcopy(rewards)
  g.filters.update(verifier="", structure="", truncated=False)  # keep every sample
  g.select.update(per_prompt=0, order="first")
  g.tensorboard = False
  return g


def _eval(tok: str, init: str, data: str) -> ml_collections.ConfigDict:
  e = eval_config()
  e.tokenizer = tok
  e.model = model_group(**POLICY)
  e.model.init_from = init
  e.eval = eval_group(benchmarks=f"{data}/held_out.jsonl", k=4, max_new_tokens=80,
                      batch_size=64, max_prompt_tokens=128, stop=ANSWER_STOPS)
  e.tensorboard = False
  return e


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, teacher="", quick=False, rm_steps=300, sft_steps=150, rl_steps=120,
                guards=True, rl_lr=5e-5)
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"  # the stages of c.order in turn, then the report
  c.seed = 0  # seeds the scenario data (each stage config has its own seed, 0)
  c.allow_changes = ""  # fields a re-run may change in a stage that ran
  order = ["teacher"] if not a.teacher else []
  teacher = a.teacher or "{workdir}/teacher"
  data, tok = f"{teacher}/data", f"{teacher}/data/tokenizer.model"
  if not a.teacher:
    zero = pathlib.Path(__file__).with_name("tiny_zero.py")
    c.teacher = config_from_file(zero, "quick" if a.quick else None)  # that pipeline
  c.scenarios = ml_collections.ConfigDict(dict(  # r1jax/data/scenarios.py: write_scenarios
      sft_math=2000, sft_general=600, sft_unsafe=600, pairs=4000, eval_pairs=512,
      rl_math=400, rl_general=200, rl_unsafe=200, held_out_math=64))
  rm_steps = 60 if a.quick else a.rm_steps
  c.rm_helpful = _reward_model(tok, "helpful", rm_steps)  # summary-view helpfulness RM
  c.rm_safety = _reward_model(tok, "safety", rm_steps)  # whole-response safety RM
  s = sft_config(steps=30 if a.quick else a.sft_steps)
  s.tokenizer = tok
  s.model = model_group(**POLICY)
  s.model.init_from = f"{teacher}/rl/final"
  s.data.update(train="{workdir}/scenarios/sft.jsonl", batch=16, seq_len=128,
                template="r1_zero")
  s.opt.update(lr=5e-4, warmup_steps=10, schedule="cosine", total_steps=s.steps,
               final_lr_ratio=0.1, weight_decay=0.1)
  s.ckpt.every, s.log_every, s.tensorboard = 50, 25, False
  c.sft = s  # stage-3 SFT: reasoning + general + unsafe demonstrations
  rl_steps = 10 if a.quick else a.rl_steps
  c.rl = _rl(tok, rl_steps, 0.5, a.guards, a.rl_lr)  # all-scenario GRPO, language reward on
  c.rl_no_lang = _rl(  # the same, language logged, not rewarded
      tok, rl_steps, 0.0, a.guards, a.rl_lr)
  c.eval_teacher = _eval(tok, f"{teacher}/rl/final", data)  # the R1-Zero policy
  c.eval_start = _eval(tok, "{workdir}/sft/final", data)  # held-out pass@1, k = 4
  c.eval_rl = _eval(tok, "{workdir}/rl/final", data)  # same protocol
  c.eval_rl_no_lang = _eval(tok, "{workdir}/rl_no_lang/final", data)  # same protocol
  c.rewards_start = _rewards_eval(tok, "{workdir}/sft/final", c.rl.rewards)  # mixed held-out
  c.rewards_rl = _rewards_eval(tok, "{workdir}/rl/final", c.rl.rewards)  # same prompts, key
  c.rewards_rl_no_lang = _rewards_eval(  # same prompts, key
      tok, "{workdir}/rl_no_lang/final", c.rl.rewards)
  order += ["rm_helpful", "rm_safety", "sft", "rl", "rl_no_lang", "eval_teacher", "eval_start",
            "eval_rl", "eval_rl_no_lang", "rewards_start", "rewards_rl", "rewards_rl_no_lang"]
  c.order = tuple(order)  # run order
  c.report = ml_collections.ConfigDict(dict(  # pass@1 vs the start; rewards; RM accuracy
      reference="eval_teacher", base="eval_start",
      rewards=("rewards_start", "rewards_rl", "rewards_rl_no_lang"),
      reward_models=("rm_helpful", "rm_safety")))
  c.lock()
  return c
