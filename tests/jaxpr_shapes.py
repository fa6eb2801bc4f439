"""Every array shape a traced function produces, sub-computations (scan, map, remat,
custom_vjp bodies) included: for tests that assert an intermediate is never built."""

import jax
from jax.extend import core as jex_core


def _walk(jaxpr, out: set) -> None:
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      out.add(tuple(getattr(v.aval, "shape", ())))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jex_core.ClosedJaxpr):
          _walk(sub.jaxpr, out)
        elif isinstance(sub, jex_core.Jaxpr):
          _walk(sub, out)


def output_shapes(fn, *args) -> set[tuple[int, ...]]:
  """The shapes of every op output in fn(*args)'s jaxpr, nested bodies included."""
  out: set[tuple[int, ...]] = set()
  _walk(jax.make_jaxpr(fn)(*args).jaxpr, out)
  return out
