"""k completions per prompt as host data: texts, tokens, logprobs, lengths and stop reasons.

The engine is the one front end to the jitted sampler for every stage that samples: RL
rollouts, held-out evaluation, and the `generate` stage (rejection sampling, distillation
data). It fixes the sampling settings and the tokenizer once, runs the sampler on the mesh,
brings the result to the host in one transfer and detokenises it. Rows are grouped
[prompt0 × k, prompt1 × k, …]. With several processes, each host gets its own prompts' rows.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from r1jax.core import multihost
from r1jax.core.config import ModelConfig
from r1jax.core.tokenizer import Tokenizer
from r1jax.generation.sampler import (STOP_LENGTH, Rollout, Sampler, SamplingParams,
                                      keep_rows, stop_token_ids)


@dataclasses.dataclass(frozen=True)
class Samples:
  """N = B·k sampled completions on the host (row i samples prompt i // k)."""

  prompt_tokens: np.ndarray  # (B, S) int32 left-padded prompts as sampled
  prompt_mask: np.ndarray  # (B, S) bool
  tokens: np.ndarray  # (N, T) int32 completion tokens, pad_id after the end
  mask: np.ndarray  # (N, T) bool: real completion tokens (the EOS / stop token included)
  logprobs: np.ndarray  # (N, T) f32 sampler log p(token) at the sampling temperature
  stop_reason: np.ndarray  # (N,) int32: STOP_LENGTH / STOP_EOS / STOP_STOP
  texts: tuple[str, ...]  # (N,) detokenised completions, special ids dropped
  group: int  # k: completions per prompt
  top_ids: np.ndarray | None = None  # (N, T, k) int32: the k likeliest tokens at each step
  top_logprobs: np.ndarray | None = None  # (N, T, k) f32: their log-probs (temperature 1)

  @property
  def lengths(self) -> np.ndarray:
    """(N,) int: real completion tokens per row."""
    return self.mask.sum(-1)

  @property
  def truncated(self) -> np.ndarray:
    """(N,) bool: hit the token budget without an EOS or stop sequence."""
    return self.stop_reason == STOP_LENGTH

  def by_prompt(self, values: Sequence) -> list[list]:
    """Per-row values regrouped as one list of k per prompt."""
    k = self.group
    return [list(values[i * k:(i + 1) * k]) for i in range(len(values) // k)]


def detokenise(tokenizer: Tokenizer, tokens_NxT: np.ndarray, mask_NxT: np.ndarray) -> tuple:
  """Completion texts: padding and special ids (EOS, pad) dropped."""
  return tuple(tokenizer.decode(tokenizer.strip_specials(t[m]))
               for t, m in zip(tokens_NxT, mask_NxT))


def concat_samples(parts: Sequence[Samples]) -> Samples:
  """Samples of several batches joined row-wise; prompts left-padded to the widest bucket."""
  s = max(p.prompt_tokens.shape[1] for p in parts)
  pad = lambda x: np.pad(x, ((0, 0), (s - x.shape[1], 0)))
  cat = lambda f, fn=lambda x: x: (None if getattr(parts[0], f) is None
                                   else np.concatenate([fn(getattr(p, f)) for p in parts]))
  return dataclasses.replace(
      parts[0], **{f: cat(f) for f in ("tokens", "mask", "logprobs", "stop_reason", "top_ids",
                                       "top_logprobs")},
      prompt_tokens=cat("prompt_tokens", pad), prompt_mask=cat("prompt_mask", pad),
      texts=sum((p.texts for p in parts), ()))


class Engine:
  """A sampler bound to a model, a mesh, a tokenizer and sampling settings."""

  def __init__(self, cfg: ModelConfig, mesh: Mesh | None, tokenizer: Tokenizer, *,
               temperature: float, max_new_tokens: int, max_prompt_len: int,
               top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
               record_top_k: int = 0):
    self.tokenizer, self.stop = tokenizer, tuple(stop)
    self.sampler = Sampler(cfg, mesh, max_prompt_len=max_prompt_len)
    self.params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, stop_ids=stop_token_ids(tokenizer, stop),
        pad_id=tokenizer.pad_id, record_top_k=record_top_k)

  @property
  def max_prompt_len(self) -> int:
    return self.sampler.max_prompt_len

  def launch(self, params, prompts: Sequence[Sequence[int]], key: jax.Array, k: int,
             pad_to: int = 0) -> Rollout:
    """Samples k completions of each prompt; returns the sampler's device arrays.

    Returns when decoding has ended (the segment loop reads each segment's live-row count);
    the transfer to the host is left to `collect`, so the caller may first queue more device
    work on the result (RL's reference forward).
    """
    prompts = list(prompts) + [prompts[0]] * (pad_to - len(prompts))  # one shape per batch
    return self.sampler.generate(params, prompts, self.params, key, group=k)

  def collect(self, rollout: Rollout, k: int, prompts: int | None = None) -> Samples:
    """A launched rollout on the host (one transfer), detokenised.

    prompts: keep only the first `prompts` prompts' rows (a padded batch's real ones).
    """
    host = multihost.host_rows(rollout)  # with several processes, this host's rows
    return self._samples(host if prompts is None else keep_rows(host, prompts, k), k)

  def sample_many(self, params, prompts: Sequence[Sequence[int]], key: jax.Array, k: int,
                  batch_size: int, progress: bool = False) -> Samples:
    """k completions of each prompt, in fixed-size batches (the last one padded). With
    several processes, every process passes all the prompts: each batch is decoded by all
    together, each feeding and getting back its share (`multihost.host_share`), so the
    result holds this process's prompts, `multihost.host_indices(len(prompts), batch_size)`."""
    parts, start, batches = [], time.perf_counter(), range(0, len(prompts), batch_size)
    for i, lo in enumerate(batches):
      chunk, real = multihost.host_share(prompts[lo:lo + batch_size], batch_size)
      parts.append(self.collect(self.launch(params, chunk, jax.random.fold_in(key, i), k), k,
                                prompts=real))
      if progress:
        tokens = sum(int(p.lengths.sum()) for p in parts)
        print(f"\rsampling: batch {i + 1}/{len(batches)}, {tokens} tokens, "
              f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s",
              end="\n" if i + 1 == len(batches) else "", file=sys.stderr, flush=True)
    return concat_samples(parts)

  def _samples(self, host: Rollout, k: int) -> Samples:
    tokens, mask = np.asarray(host.tokens), np.asarray(host.mask)
    top = lambda x: None if x is None else np.asarray(x)
    return Samples(np.asarray(host.prompt_tokens), np.asarray(host.prompt_mask), tokens, mask,
                   np.asarray(host.logprobs), np.asarray(host.stop_reason),
                   detokenise(self.tokenizer, tokens, mask), k, top(host.top_ids),
                   top(host.top_logprobs))
