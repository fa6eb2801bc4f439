"""The real-size R1 chain (experiments/r1_qwen2p5_7b.py) with tiny shapes substituted: every
stage's config is built as shipped, its model swapped for a tiny Qwen2 folder in HF format
(the real loading path), its data for files of the miniature world, and its first step runs
on CPU, in the chain's order, so that none of the configs rots."""

import json
import shutil
from pathlib import Path

import jax
import pytest

from r1jax import stages
from r1jax.core import hf, model
from r1jax.core.config import config_from_file, model_config, model_group
from r1jax.data import scenarios
from r1jax.stages import pipeline
from tiny_world import MODEL, make_world

REPO = Path(pipeline.__file__).resolve().parents[2]


# Tiny shapes with the real models' embedding ties: Qwen2.5-7B unties, the 1.5Bs tie.
SHAPES = {"base": {**MODEL, "vocab_size": 384, "max_position": 512, "tie_embeddings": False,
                   "hidden": 64, "heads": 8, "kv_heads": 8, "head_dim": 8, "mlp_dim": 128}}
SHAPES["student"] = {**SHAPES["base"], "hidden": 16, "heads": 2, "kv_heads": 1,
                     "tie_embeddings": True}
SHAPES["rm"] = {**SHAPES["base"], "layers": 1, "tie_embeddings": True}


def _hf_folder(path: Path, shape: dict) -> str:
  """A random tiny Qwen2-shaped model written as an HF folder (config + safetensors)."""
  cfg = model_config(model_group(**shape))
  hf.save_pretrained(cfg, model.init_params(cfg, jax.random.key(0)), path)
  return str(path)


def _data(root: Path, world: dict) -> None:
  """DATA/… as the real config expects it, from the miniature world."""
  # MATH's row format (problem, solution), the miniature's short problems.
  rows = [{"problem": r["question"], "solution": f"\\boxed{{{r['answer']}}}"}
          for r in map(json.loads, open(world["held_out"]))]
  for name in ("math/train.jsonl", "math500/test.jsonl"):
    (root / name).parent.mkdir(parents=True)
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
  paths = scenarios.write_scenarios(root / "scn", seed=0, sft_math=8, sft_general=8,
                                    sft_unsafe=8, pairs=16, eval_pairs=8, rl_math=4,
                                    rl_general=2, rl_unsafe=0, fmt="readable",
                                    sft_template="r1_zero")
  for src, dst in (("rl_mix", "mix/train"), ("sft", "general/sft"),
                   ("helpful_train", "helpful/train"), ("helpful_eval", "helpful/eval"),
                   ("safety_train", "safety/train"), ("safety_eval", "safety/eval")):
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths[src], root / f"{dst}.jsonl")


def _shrink(s, tok: str, data: Path, shape: dict) -> None:
  """One step, a few tokens and rows; the toy tokenizer; the tiny shape of its model."""
  s.tokenizer = tok
  s.model.update(param_dtype="float32", compute_dtype="float32", **shape)
  s.tensorboard = False
  # FSDP over all 8 test devices, the shipped (1, -1, 1), hangs XLA:CPU's collectives in the
  # RL update now and then (a rendezvous waits for ever; WORKSPACE.md, "Tests"): 2 × 4 here.
  s.mesh.shape = (2, 4, 1)
  if s.stage in ("rl", "sft", "reward_model"):
    s.steps = 1
    s.ckpt.update(every=1, async_save=False)
  if s.stage == "rl":
    s.data.update(batch=2, max_prompt_tokens=400)
    s.grpo.update(group_size=2, minibatches=1)
    s.sampler.max_new_tokens = 8
    s.eval.benchmarks = ""  # the first step only
    if s.rewards.get("models"):
      for m in s.rewards.models:
        m.update(tokenizer=tok, max_len=64, batch_size=4, template="plain")  # as trained
      s.rewards.num_workers = 1
  if s.stage == "sft":
    s.data.update(batch=8, seq_len=512)  # a rendered prompt is ~300 toy tokens
    s.microbatches = 1
    s.opt.update(total_steps=2, warmup_steps=1)
    if "samples-h00000" in s.data.train:  # a tiny random model's samples pass no filter
      s.data.train = str(data / "general" / "sft.jsonl")
  if s.stage == "reward_model":
    s.data.update(batch=4, max_len=64, template="plain")
    s.eval_every = 1
  if s.stage == "generate":
    s.data.update(limit=2, max_prompt_tokens=400)
    s.k, s.batch_prompts = 2, 2
    s.sampler.max_new_tokens = 8
    s.rewards.num_workers = 1


@pytest.mark.slow
def test_every_real_size_stage_builds_and_runs_its_first_step(tmp_path):
  world = make_world(tmp_path / "world")
  _data(tmp_path / "data", world)
  base, student, rm = (_hf_folder(tmp_path / n, SHAPES[n]) for n in ("base", "student", "rm"))
  c = config_from_file(REPO / "experiments" / "r1_qwen2p5_7b.py",
                       f"base={base},student={student},rm_base={rm},data={tmp_path}/data,"
                       "max_new_tokens=8")
  work = tmp_path / "run"
  ran = {}
  for name in c.order:
    s = pipeline.resolve(c[name], work)
    s.unlock()
    kind = "rm" if name.startswith("rm_") else "student" if "student" in name else "base"
    _shrink(s, world["tokenizer"], tmp_path / "data", SHAPES[kind])
    s.lock()
    out = stages.run(s, str(work / name)) or {}
    ran[name] = out.get("stage")
    if s.stage in ("rl", "sft", "reward_model"):
      assert out.get("step") == 1, (name, out)
    if s.stage == "generate":
      assert out["samples"] == 4, (name, out)
  assert ran == {n: c[n].stage for n in c.order}
  assert len(c.order) == 12 and (work / "student_rl" / "final").is_dir()
