"""The whole DeepSeek-R1 recipe at real size, Qwen2.5-7B (base) to a 1.5B student: the stages
of experiments/tiny_r1.py with the paper's settings where they apply, as one resumable
pipeline (a finished stage is skipped on a re-run, a killed one resumes).

  python -m r1jax.main --config=experiments/r1_qwen2p5_7b.py:base=/data/Qwen2.5-7B,\\
student=/data/Qwen2.5-1.5B,rm_base=/data/Qwen2.5-1.5B-Instruct,data=/data/r1 \\
      --workdir=/data/runs/r1 --distributed

Files under DATA (local jsonl): math/train.jsonl and math500/test.jsonl (problems with gold
answers), mix/train.jsonl (all-scenario RL rows with a "task": math, general; the general
ones judged by the RMs), helpful/{train,eval}.jsonl and safety/{train,eval}.jsonl
(preference pairs), general/sft.jsonl (non-reasoning SFT rows {"prompt", "completion"},
prompts rendered in the R1-Zero template as the generate stage writes its samples). One
prompt template throughout, R1-Zero's, so every SFT row and RL prompt look alike.

Stages: zero (R1-Zero, experiments/r1_zero_qwen2p5_7b_math.py) → cold_start_data (its samples,
R1's filters, readable format: rs_qwen2p5_7b_math.py:mode=cold_start) → cold_start (SFT of
the base) → reasoning (GRPO with accuracy, readable format and language consistency) →
rs_data (rejection sampling, rs_qwen2p5_7b_math.py) → rs_sft (SFT of the base on rs_data and
the general rows) → rm_helpful, rm_safety (1.5B Bradley-Terry RMs, reward_model.py) → r1
(all_scenario_qwen2p5_7b.py) → distill_data (R1's filtered traces) → student_distill
(distill_qwen2p5_1p5b.py) → student_rl (R1-Zero's recipe on the student: the paper's control).
A test builds every stage with tiny shapes and runs its first step on CPU (test_r1_real.py).
"""

import pathlib

import ml_collections

from r1jax.core.config import config_from_file, eval_group, parse_arg

HERE = pathlib.Path(__file__).parent


def _load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_from_file(HERE / name, arg)
  c.unlock()
  return c


def _sft(base: str, train: str, steps: int) -> ml_collections.ConfigDict:
  """Cold-start / RS SFT of the 7B base: distill_qwen2p5_1p5b.py's recipe at 7B (samples
  carry their rendered prompts: template '')."""
  s = _load("distill_qwen2p5_1p5b.py", f"steps={steps},seq_len=8192,batch=32")
  s.model.update(_load("r1_zero_hf.py").model.to_dict())  # 7B, f32 master weights, remat
  s.model.hf_dir, s.tokenizer = base, base
  s.data.update(train=train, template="", epochs=2)
  return s


def _readable_rl(c: ml_collections.ConfigDict, init: str, language: float) -> None:
  """R1's reasoning RL on an R1-Zero-recipe config: readable format (ends at EOS), language
  consistency, the cold-started checkpoint."""
  c.model.init_from = init  # the cold-started policy
  c.sampler.stop = ()  # the readable format ends at EOS
  c.eval.stop = ()  # so do its evals
  c.rewards.components = [{"name": "accuracy", "tasks": ["math"]},  # accuracy, readable format, lan
                          {"name": "format", "weight": 0.5,
                           "kwargs": {"require_answer_tag": False}},
                          {"name": "language", "weight": language, "kwargs": {"lang": "en"}}]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, base="Qwen2.5-7B", student="Qwen2.5-1.5B", rm_base="Qwen2.5-1.5B-Instruct",
                data="data", max_new_tokens=4096)
  d, n = a.data, a.max_new_tokens
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"  # the stages of c.order in turn
  c.seed = 0  # each stage config has its own seed
  c.allow_changes = ""  # fields a re-run may change in a stage that ran
  math, bench = f"{d}/math/train.jsonl", f"{d}/math500/test.jsonl"

  z = _load("r1_zero_qwen2p5_7b_math.py", f"max_new_tokens={n}")
  z.model.hf_dir, z.tokenizer = a.base, a.base
  z.data.train, z.eval.benchmarks = math, bench
  c.zero = z  # R1-Zero

  g = _load("rs_qwen2p5_7b_math.py", f"mode=cold_start,max_new_tokens={n}")
  g.model.init_from, g.tokenizer, g.data.prompts = "{workdir}/zero/final", a.base, math
  g.data.limit = 8000  # a few thousand kept: R1's cold start
  c.cold_start_data = g  # R1-Zero's samples, filtered, readable
  c.cold_start = _sft(a.base, "{workdir}/cold_start_data/samples-h00000.jsonl", 1000)  # SFT of the 

  r = _load("r1_zero_qwen2p5_7b_math.py", f"max_new_tokens={n}")
  r.tokenizer, r.data.train, r.eval.benchmarks = a.base, math, bench
  _readable_rl(r, "{workdir}/cold_start/final", 0.1)
  c.reasoning = r  # reasoning RL with the language reward

  s = _load("rs_qwen2p5_7b_math.py", f"max_new_tokens={n}")
  s.model.init_from, s.tokenizer, s.data.prompts = "{workdir}/reasoning/final", a.base, math
  s.sampler.stop = ()  # the reasoning policy writes the readable format already
  s.output.readable = False
  c.rs_data = s  # rejection sampling
  c.rs_sft = _sft(a.base, "{workdir}/rs_data/samples-h00000.jsonl,"  # SFT of the base on both
                  f"{d}/general/sft.jsonl", 3000)

  for name in ("helpful", "safety"):
    m = _load("reward_model.py", "model=qwen2.5-1.5b")
    m.model.hf_dir, m.tokenizer = a.rm_base, a.rm_base
    m.data.update(train=f"{d}/{name}/train.jsonl", eval=f"{d}/{name}/eval.jsonl")
    c[f"rm_{name}"] = m

  f = _load("all_scenario_qwen2p5_7b.py",
            f"max_new_tokens={n},helpful_rm={{workdir}}/rm_helpful/reward_model,"
            f"safety_rm={{workdir}}/rm_safety/reward_model,rm_tokenizer={a.rm_base}")
  f.model.init_from, f.tokenizer = "{workdir}/rs_sft/final", a.base
  f.data.update(train=f"{d}/mix/train.jsonl", template="r1_zero")
  f.data.task_weights = ml_collections.ConfigDict(dict(math=0.7, general=0.3))
  f.eval.update(benchmarks=bench, template="r1_zero")
  c.r1 = f  # all-scenario RL: "R1"

  t = _load("rs_qwen2p5_7b_math.py", f"max_new_tokens={n},k=4")
  t.model.init_from, t.tokenizer, t.data.prompts = "{workdir}/r1/final", a.base, math
  t.sampler.stop = ()
  t.output.readable = False
  t.select.update(per_prompt=2, order="random")
  c.distill_data = t  # R1's traces

  sd = _load("distill_qwen2p5_1p5b.py", "seq_len=8192")
  sd.model.hf_dir, sd.tokenizer = a.student, a.student
  sd.data.update(train="{workdir}/distill_data/samples-h00000.jsonl", template="")
  c.student_distill = sd  # the student fine-tuned on R1's traces

  sr = _load("r1_zero_qwen2p5_1p5b_gsm8k.py")
  sr.model.hf_dir, sr.tokenizer = a.student, a.student
  sr.data.update(train=math, adapter="math", max_prompt_tokens=1024)
  sr.sampler.max_new_tokens = n
  sr.eval = eval_group(**{**sr.eval.to_dict(), "benchmarks": bench, "max_new_tokens": n,
                          "max_prompt_tokens": 1024})
  c.student_rl = sr  # the same student by RL alone

  c.order = ("zero", "cold_start_data", "cold_start", "reasoning", "rs_data", "rs_sft",  # run order
             "rm_helpful", "rm_safety", "r1", "distill_data", "student_distill", "student_rl")
  for name in c.order:
    c[name].lock()
  c.lock()
  return c
