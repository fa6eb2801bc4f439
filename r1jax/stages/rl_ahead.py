"""One step off-policy RL (`grpo.overlap`): the next iteration's rollout runs in a background
thread while this iteration's update trains.

The rollout of step n + 1 samples with the params the update of step n starts from, so every
update after the first trains on samples one policy behind. The loss is decoupled for that
(train/losses.py): the PPO ratio is taken against the update's starting policy, and each
token is weighted by the sampler's truncated importance weight (`grpo.tis_cap`).

Two modes:
- "rollout": sampling and scoring both run during the update. The devices then run the
  sampler's programs and the update's at once: a gain only where they would otherwise idle
  (on this machine's 2 CPU cores they contend, and the step is slower: measured).
- "rewards": the main thread waits until the samples are on the host, then dispatches the
  update, which runs while the background thread detokenises and scores (host work: code
  sandboxes, math-verify, reward models' host side). The devices never run both (but for
  DAPO's refill rollouts, which sample again after the first batch is scored, and reward
  models' forwards in one process). In several processes with reward models the update
  also waits for the scores (stages/rl.before_update): the models' forwards are device
  programs whose collectives every process must dispatch in the update's order.

With several processes "rollout" runs as "rewards" (stages/rl.processes_overlap: the same
samples and updates), and an overlap with DAPO's refill is refused: every process must
dispatch its device programs (and their collectives) in the same order, which holds when
the devices never run both; the background thread's agreement calls (the sampler's shapes,
the informative count) are numbered in a namespace of their own (`multihost.namespace`).

What it costs:
- one more copy of the params on the devices (the update donates its state) and in each
  checkpoint (`behaviour`), so that a resumed run samples step n + 1 exactly as the
  uninterrupted run did: resume stays bit-exact;
- the reference's logprobs move into the update (the reference may be reset in between);
- the held-out eval waits for the pending rollout first (the reward pool serves one caller).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

from r1jax.core import multihost
from r1jax.core.background import Pending, in_thread
from r1jax.core.metrics import StepTimer

log = logging.getLogger(__name__)

# collect(params, timer, sampled) -> the step's scored rollouts (stages/rl.py `collect`,
# bound); it sets `sampled` once the samples are on the host.
Collect = Callable[[Any, StepTimer, threading.Event], list]


@dataclasses.dataclass
class Ahead:
  """A rollout running one step ahead, and what a checkpoint needs to replay it."""

  pending: Pending[list]  # collect's result, on the "rl-ahead" thread (one at a time)
  behaviour: Any  # the params it samples with (the policy one update behind)
  data_state: dict  # the prompt iterator's state before the rollout drew its prompts
  timer: StepTimer  # its own rollout / reward seconds (the loop's timer is the main thread's)
  sampled: threading.Event  # set once the samples are on the host (or the thread ended)

  def metrics(self) -> dict[str, float]:
    """Seconds the rollout and its scoring took in the background (hidden from the step's
    time/ split where the update covered them; time/rollout is the wait that was not)."""
    return {f"ahead/{k}_s": v for k, v in self.timer.seconds.items()}


def start(collect: Collect, params: Any, data: Any, copy: bool = True) -> Ahead:
  """Starts `collect` on `params` in a background thread, after noting the data state.

  `copy`: sample from a copy, dispatched now, before the caller's update donates `params`.
  """
  behaviour = jax.tree.map(jnp.copy, params) if copy else params
  data_state = data.get_state()
  timer, sampled = StepTimer(), threading.Event()

  def run() -> list:
    try:
      with multihost.namespace("rl-ahead"):  # its agreement calls apart from the main thread's
        return collect(behaviour, timer, sampled)
    finally:
      sampled.set()  # a failed rollout must not leave the main thread waiting

  return Ahead(in_thread("rl-ahead", run), behaviour, data_state, timer, sampled)


def finish(ahead: Ahead | None) -> None:
  """At the end of a run (or a preemption): lets a pending rollout end; its result is
  dropped (a resumed run replays it from the checkpoint), and so is an error it raised."""
  if ahead is None:
    return
  if ahead.pending.error is not None:
    log.warning("the dropped one-step-ahead rollout had failed: %r", ahead.pending.error)
