"""sha256 of a params checkpoint (model.json + params/), e.g. WORKDIR/rl/final.

  python tools/params_digest.py --path=/tmp/z/rl/final [--compare=/tmp/z2/rl/final]

Every array, in sorted name order, contributes its name, dtype, shape and bytes, so two
digests are equal only for bit-identical params. With --compare it also prints the largest
absolute difference per array group. Used to prove that a refactor changed no numbers.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from absl import app, flags

from r1jax.core import model
from r1jax.core.checkpoint import load_params

_PATH = flags.DEFINE_string("path", None, "A params checkpoint folder (model.json + params/).")
_COMPARE = flags.DEFINE_string("compare", None, "Optional second checkpoint to diff against.")


def host_params(path: str) -> dict[str, np.ndarray]:
  """name -> host array of a params checkpoint (restored on one device)."""
  _, params = load_params(path)
  return {name: np.asarray(x) for name, x in model.flatten(params).items()}


def digest(flat: dict[str, np.ndarray]) -> str:
  """sha256 over (name, dtype, shape, bytes) of every array, in sorted name order."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    h.update(name.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _PATH.value:
    raise app.UsageError("--path is required")
  a = host_params(_PATH.value)
  out = {"path": _PATH.value, "sha256": digest(a)}
  if _COMPARE.value:
    b = host_params(_COMPARE.value)
    if set(a) != set(b):
      raise app.UsageError(f"the two checkpoints hold different params: {sorted(set(a) ^ set(b))}")
    diff = {n: float(np.max(np.abs(a[n].astype(np.float64) - b[n].astype(np.float64))))
            for n in sorted(a)}
    out.update(compare=_COMPARE.value, compare_sha256=digest(b),
               max_abs_diff=max(diff.values()), worst=max(diff, key=diff.get))
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
