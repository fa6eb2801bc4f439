"""One process of a 2-process run on this machine, for tests/test_multihost.py:

  python tests/multihost_worker.py SCENARIO PORT PROCESS_ID OUT_DIR HEARTBEAT_S

`jax.distributed` on localhost, 2 CPU devices per process (4 in all). A RunError ends the
process with its exit status, as `python -m r1jax.main` does.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=64, hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, mlp_dim=64,
            max_position=64)
ROWS, WIDTH, STEPS = 8, 16, 2


def global_batch(step: int):
  """The same global SFT batch on every process (and in the 1-process reference)."""
  from r1jax.train.batches import SFTBatch
  rng = np.random.default_rng(step)
  tokens = rng.integers(1, TINY["vocab_size"], (ROWS, WIDTH)).astype(np.int32)
  mask = np.arange(WIDTH)[None, :] < rng.integers(WIDTH // 2, WIDTH + 1, (ROWS, 1))
  return SFTBatch(tokens=tokens, mask=mask, loss_mask=mask.copy())


def sft_params(rows_of: "callable", devices=None) -> dict:
  """STEPS SFT updates of the tiny model on the global batches, each process putting
  `rows_of(batch)` (Trainer.put_batch); the params as numpy (replicated: any copy)."""
  import jax
  from r1jax.core import sharding
  from r1jax.core.config import ModelConfig, OptConfig
  from r1jax.train.trainer import Trainer
  # Adam's eps at 1e-4, near small gradient entries: its steps are then about linear in the
  # gradients, so the params compare them (at 1e-8 an all-reduce's round-off in an entry
  # with |g| ~ eps moves it by ~lr)
  opt = OptConfig(lr=1e-3, eps=1e-4)
  trainer = Trainer(ModelConfig(**TINY), opt, sharding.make_mesh((-1, 1, 1), devices))
  state = trainer.init_state_random(jax.random.key(0))
  for step in range(STEPS):
    state, _ = trainer.sft_step(state, trainer.put_batch(rows_of(global_batch(step))))
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  return {jax.tree_util.keystr(k): np.asarray(v.addressable_shards[0].data) for k, v in leaves}


def _sft(pid: int, out: Path) -> None:
  import jax
  from r1jax.core import multihost
  rows = multihost.local_rows(ROWS)
  local = lambda b: jax.tree.map(lambda x: x[rows], b)
  params = sft_params(local)
  if pid == 0:
    np.savez(out / "params.npz", **params)


def _once(pid: int, out: Path) -> None:
  from r1jax.core import errors, multihost
  value = multihost.run_once("prepare", lambda: {"rows": 3})
  assert value == {"rows": 3}, value
  multihost.barrier("after-prepare", timeout_s=30)
  assert multihost.mean_over_processes({"x": float(pid)}) == {"x": 0.5}

  def bad():
    raise errors.DataError("data: row 7 of prompts.jsonl is not JSON")
  multihost.run_once("bad-data", bad)  # raises on both processes
  (out / f"went-on-{pid}").write_text("")


def _lost(pid: int, out: Path) -> None:
  from r1jax.core import multihost
  multihost.barrier("started", timeout_s=30)
  if pid == 1:
    os.kill(os.getpid(), 9)
  (out / "waiting").write_text(str(time.time()))
  multihost.barrier("never", timeout_s=600)  # process 1 never comes


SCENARIOS = {"sft": _sft, "once": _once, "lost": _lost}


def main() -> None:
  scenario, port, pid, out, heartbeat = sys.argv[1:6]
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  from r1jax.core import errors, multihost
  multihost.initialize(multihost.Cluster(
      coordinator=f"localhost:{port}", num_processes=2, process_id=int(pid),
      heartbeat_timeout_s=int(heartbeat), shutdown_timeout_s=10, init_timeout_s=60))
  try:
    SCENARIOS[scenario](int(pid), Path(out))
  except errors.RunError as e:
    print(f"{type(e).__name__} (exit {e.exit_code}): {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  main()
