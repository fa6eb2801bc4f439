"""The RL stage: rollouts from the sampler, host rewards, GRPO updates.

This module grows into the RL loop; for now it holds the conversion from a
sampler Rollout to the trainer's RolloutBatch, shared by the loop and tools.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from r1jax.sampler import STOP_LENGTH, Rollout
from r1jax.train_step import RolloutBatch


def to_batch(rollout: Rollout, advantages_N, group: int) -> RolloutBatch:
  """Prompt (left-padded, repeated G times) + completion rows for `Trainer.rl_step`."""
  prompt_NxS = jnp.repeat(rollout.prompt_tokens, group, axis=0)
  pmask_NxS = jnp.repeat(rollout.prompt_mask, group, axis=0)
  return RolloutBatch(
      tokens=jnp.concatenate([prompt_NxS, rollout.tokens], axis=1),
      mask=jnp.concatenate([pmask_NxS, rollout.mask], axis=1),
      completion_mask=rollout.mask,
      old_logp=rollout.logprobs,
      advantages=jnp.asarray(advantages_N, jnp.float32),
      truncated=jnp.asarray(np.asarray(rollout.stop_reason) == STOP_LENGTH))
