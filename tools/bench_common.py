"""Shared by the bench_* tools: their common flags, random HF checkpoints of the benchmark
shapes, prompts, FLOP counts."""

import dataclasses

import numpy as np
from absl import flags

SHAPES = {
    "3.5m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=768, vocab_size=1024),
    "30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=2048, vocab_size=1024),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}


def use_cpu_devices(n: int) -> None:
  """Before JAX starts: expose n CPU devices (0 = JAX's default of one; -1 = one per core,
  as `python -m r1jax.main` does)."""
  import os

  import jax
  from r1jax.core import sharding
  n = sharding.cpu_devices_to_request(n, os.environ.get("XLA_FLAGS", ""),
                                      os.environ.get("JAX_NUM_CPU_DEVICES", ""))
  if n:
    jax.config.update("jax_num_cpu_devices", n)


@dataclasses.dataclass(frozen=True)
class CheckpointFlags:
  """--hf_dir, --make_random, --r1_shaped and --cpu_devices: what a benchmark runs on."""

  hf_dir: flags.FlagHolder
  make_random: flags.FlagHolder
  r1_shaped: flags.FlagHolder
  cpu_devices: flags.FlagHolder

  def prepare(self) -> str:
    """Before JAX starts: the CPU devices set, the random checkpoint written when asked.
    Returns the HF folder."""
    use_cpu_devices(self.cpu_devices.value)
    if self.make_random.value:
      make_random(self.hf_dir.value, self.make_random.value, r1_shaped=self.r1_shaped.value)
    return self.hf_dir.value


def checkpoint_flags(cpu_devices: int = -1) -> CheckpointFlags:
  """Defines the checkpoint and device flags (--hf_dir required)."""
  out = CheckpointFlags(
      flags.DEFINE_string("hf_dir", None, "HF checkpoint folder (written by --make_random)."),
      flags.DEFINE_enum("make_random", None, list(SHAPES),
                        "First write a random Qwen2 of this shape to --hf_dir."),
      flags.DEFINE_bool("r1_shaped", False, "With --make_random: a checkpoint that ends its "
                        "completions at EOS with heavy-tailed lengths (`make_random`)."),
      cpu_devices_flag(cpu_devices))
  flags.mark_flag_as_required("hf_dir")
  return out


def cpu_devices_flag(default: int = -1) -> flags.FlagHolder:
  """Defines --cpu_devices (read by `use_cpu_devices`)."""
  return flags.DEFINE_integer("cpu_devices", default, "CPU only: run on this many CPU devices, "
                              "one mesh over them. -1: one per core; 0: JAX's single device.")


@dataclasses.dataclass(frozen=True)
class RolloutFlags:
  """--prompts, --group, --prompt_len and --dtype: the batch a benchmark samples."""

  prompts: flags.FlagHolder
  group: flags.FlagHolder
  prompt_len: flags.FlagHolder
  dtype: flags.FlagHolder


def rollout_flags(dtype_help: str) -> RolloutFlags:
  """Defines the rollout flags; `dtype_help` says what --dtype applies to in this tool."""
  return RolloutFlags(
      flags.DEFINE_integer("prompts", 8, "Prompts per batch (B)."),
      flags.DEFINE_integer("group", 8, "Completions per prompt (G); N = B·G sequences."),
      flags.DEFINE_integer("prompt_len", 32, "Longest prompt (lengths vary 50–100 %)."),
      flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], dtype_help))


EOS_ID = 2  # an R1-shaped checkpoint's EOS token (0 is padding)
# EOS logit an R1-shaped checkpoint is aimed at: with 1,024 near-uniform other logits, p(EOS)
# per step is about 1/350 when a step's hidden state sits at the mean. How far each step's
# hidden state strays from it spreads the lengths (benchmarks/r1_shaped.md has what it gives).
EOS_LOGIT = 2.0


def make_random(path: str, shape: str, r1_shaped: bool = False,
                eos_logit: float = EOS_LOGIT) -> None:
  """Writes a randomly initialised Qwen2 of a benchmark shape as an HF folder.

  `r1_shaped`: the model ends its completions by itself, with heavy-tailed lengths like a
  reasoning model's. The EOS row of the (tied) unembedding is set along the mean final hidden
  state, scaled so that the EOS logit is `eos_logit` at that mean: p(EOS) per step is then
  roughly constant, and lengths roughly geometric, spread by how far each context's hidden
  state strays from the mean. The folder also gets a word-level tokenizer ("t17" is id 17,
  "<eos>" id 2), so that text-based trainers (TRL) see the same ids.
  """
  import torch
  import transformers
  torch.manual_seed(0)
  extra = dict(eos_token_id=EOS_ID, pad_token_id=0) if r1_shaped else {}
  config = transformers.Qwen2Config(tie_word_embeddings=True, max_position_embeddings=4096,
                                    **SHAPES[shape], **extra)
  model = transformers.Qwen2ForCausalLM(config)
  if r1_shaped:
    _aim_eos(model, eos_logit)
    _word_tokenizer(config.vocab_size).save_pretrained(path)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = 0
  model.save_pretrained(path)


def _aim_eos(model, eos_logit: float) -> None:
  """Points the EOS row of the tied embedding along the mean final hidden state."""
  import torch
  gen = torch.Generator().manual_seed(1)
  ids = torch.randint(10, model.config.vocab_size, (16, 256), generator=gen)
  with torch.no_grad():
    h = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
    mean = h.mean(0)
    model.model.embed_tokens.weight[EOS_ID] = eos_logit * mean / mean.dot(mean)


def _word_tokenizer(vocab: int):
  """A word-level HF tokenizer over ids: "<pad>" 0, "<bos>" 1, "<eos>" 2, then "t3".."t{V-1}"."""
  import tokenizers
  import transformers
  words = {"<pad>": 0, "<bos>": 1, "<eos>": EOS_ID, **{f"t{i}": i for i in range(3, vocab)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                              pad_token="<pad>", bos_token="<bos>")


def checkpoint_eos(hf_dir: str) -> int | None:
  """The EOS id in an HF folder's config.json (None when it has none: fixed-length runs)."""
  import json
  import os
  eos = json.load(open(os.path.join(hf_dir, "config.json"))).get("eos_token_id")
  return eos[0] if isinstance(eos, list) else eos


def random_prompts(vocab: int, batch: int, longest: int, seed: int = 0) -> list[list[int]]:
  """`batch` prompts of random ids, lengths uniform in [longest/2, longest]."""
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(10, vocab, rng.integers(longest // 2, longest + 1))))
          for _ in range(batch)]


def update_flops(cfg, lengths, passes: int = 4, shared_tokens: int = 0) -> float:
  """FLOPs of `passes` forward-equivalents over sequences of these real lengths (a GRPO
  update: the policy's forward + backward = 3, the reference's forward = 1).

  Per token and pass: 2 × the matmul weights (q, k, v, o, the SwiGLU MLP, the unembedding;
  the embedding is a lookup) and causal attention, 4 × heads × head_dim per earlier token
  of its own sequence. Padding and tokens of other sequences do not count: this is the
  work any trainer must do. `shared_tokens`: prompt tokens the packer did not repeat
  (samples sharing a prompt copy); they are work not done, so they do not count either.
  """
  from r1jax.core.chips import token_matmul_flops
  per_token = token_matmul_flops(cfg)
  lengths = np.asarray(lengths, np.float64)
  attention = 4 * cfg.layers * cfg.heads * cfg.head_dim * (lengths * (lengths + 1) / 2).sum()
  return passes * (per_token * (lengths.sum() - shared_tokens) + attention)


def matmul_peak(mesh, dtype: str = "float32", rows: int = 8192) -> float:
  """FLOP/s of one large matmul ((rows, 256) × (256, 768), the benchmark model's MLP shape),
  rows split over the mesh's devices: the best this machine does on a matmul, measured."""
  import time

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = jax.device_put(jnp.ones((rows, 256), dtype), NamedSharding(mesh, P(mesh.axis_names)))
  w = jax.device_put(jnp.ones((256, 768), dtype), NamedSharding(mesh, P()))
  f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
  f(x, w).block_until_ready()
  times = []
  for _ in range(20):
    t0 = time.perf_counter()
    f(x, w).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * rows * 256 * 768 / float(np.median(times))
