"""Sampler: greedy == HF generate, logprob identity, sampling statistics, sharding, compiles."""

import dataclasses

import jax
import numpy as np
import pytest
import scipy.stats

from hf_models import LLAMA, QWEN, make_hf_model
from r1jax.core import hf
from r1jax.core import model
from r1jax.generation import sampler
from r1jax.core import sharding
from r1jax.core.config import GRPOConfig
from r1jax.generation.sampler import SamplingParams
from r1jax.train.batches import RolloutBatch
from r1jax.train.logprobs import LogProbs

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [200, 3], [9, 9, 9, 11, 250, 12, 13, 14, 15, 16, 1, 2, 3]]


@pytest.fixture(scope="module", params=["qwen", "llama"])
def pair(request, tmp_path_factory):
  m = make_hf_model(QWEN if request.param == "qwen" else LLAMA, seed=1)
  path = tmp_path_factory.mktemp("s")
  m.save_pretrained(path)
  cfg, params = hf.load_pretrained(path)
  return m, cfg, params


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  m = make_hf_model(QWEN, seed=2)
  path = tmp_path_factory.mktemp("q")
  m.save_pretrained(path)
  cfg, params = hf.load_pretrained(path)
  return cfg, params


@pytest.mark.slow
def test_greedy_matches_hf_generate(pair):
  import torch  # pylint: disable=import-outside-toplevel
  m, cfg, params = pair
  eos = 7
  sp = SamplingParams(temperature=0.0, max_new_tokens=24, eos_id=eos, pad_id=0)
  out = sampler.Sampler(cfg).generate(params, PROMPTS, sp, jax.random.key(0))
  s = out.prompt_tokens.shape[1]
  with torch.no_grad():
    ref = m.generate(input_ids=torch.tensor(np.asarray(out.prompt_tokens), dtype=torch.long),
                     attention_mask=torch.tensor(np.asarray(out.prompt_mask), dtype=torch.long),
                     do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=0,
                     top_p=None, top_k=None, temperature=None)[:, s:].numpy()
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for i in range(len(PROMPTS)):
    n = int(mask[i].sum())
    np.testing.assert_array_equal(tokens[i, :n], ref[i, :n])
    if n < 24:  # we stopped on EOS exactly where HF did
      assert tokens[i, n - 1] == eos and int(out.stop_reason[i]) == sampler.STOP_EOS


def teacher_forced_logp(params, cfg, out, group, temperature):
  """The trainer's view: log_softmax(logits / T) of each completion token, teacher-forced."""
  prompt = np.repeat(np.asarray(out.prompt_tokens), group, 0)
  pmask = np.repeat(np.asarray(out.prompt_mask), group, 0)
  tokens = np.concatenate([prompt, np.asarray(out.tokens)], 1)
  mask = np.concatenate([pmask, np.asarray(out.mask)], 1)
  logits = np.asarray(model.forward(params, tokens, cfg, mask_BxT=mask), np.float64)
  s, t = prompt.shape[1], out.tokens.shape[1]
  pred = logits[:, s - 1:s - 1 + t] / temperature
  logp = pred - scipy.special.logsumexp(pred, axis=-1, keepdims=True)
  return np.take_along_axis(logp, np.asarray(out.tokens)[..., None], -1)[..., 0]


@pytest.mark.slow
def test_logprobs_equal_teacher_forced(qwen):
  cfg, params = qwen
  # Several stop ids so rows end at different steps (early-stopped rows).
  sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=20,
                      stop_ids=tuple(range(40, 70)), eos_id=3, pad_id=0)
  group = 4
  out = sampler.Sampler(cfg).generate(params, PROMPTS, sp, jax.random.key(1), group=group)
  mask = np.asarray(out.mask)
  lengths = mask.sum(1)
  assert lengths.min() < 20 and lengths.max() == 20, lengths  # both kinds of rows present
  ref = teacher_forced_logp(params, cfg, out, group, 0.7)
  assert np.abs(np.asarray(out.logprobs) - ref)[mask].max() <= 1e-5
  assert np.all(np.asarray(out.logprobs)[~mask] == 0)
  # Rows stop on the first stop/eos token and pad afterwards.
  for row, n in zip(np.asarray(out.tokens), lengths):
    assert not np.isin(row[:n - 1], [q[0] for q in sp.stop_ids] + [3]).any()
    assert np.all(row[n:] == 0)


@pytest.mark.slow
def test_compaction_and_cache_windows_change_no_draw(qwen):
  """Decode that follows the live rows (compacted into fewer slots, the cache grown in
  windows) draws the same tokens as one lockstep loop over every row, on one device and
  on a mesh, and its log-probs still equal the teacher-forced ones."""
  cfg, params = qwen
  sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=40,
                      stop_ids=tuple(range(40, 50)), eos_id=3, pad_id=0, record_top_k=3)
  group, budgets = 8, [40, 25, 33]
  lockstep = sampler.Sampler(cfg, window=64, min_rows=0)
  ref = jax.device_get(lockstep.generate(params, PROMPTS, sp, jax.random.key(4), group=group,
                                         max_new_tokens=budgets))
  assert [k[0] for k in lockstep._fns].count("resize") == 0
  lengths = ref.mask.sum(1)
  assert lengths.min() < 10 and lengths.max() == 40, lengths  # uneven rows: compaction runs
  mesh = sharding.make_mesh((2, 2, 2))
  on_mesh = jax.device_put(params, sharding.tree_shardings(model.param_axes(cfg), params, mesh))
  for smp, p in [(sampler.Sampler(cfg, window=16, min_rows=3), params),
                 (sampler.Sampler(cfg, mesh, window=16, min_rows=3), on_mesh)]:
    out = jax.device_get(smp.generate(p, PROMPTS, sp, jax.random.key(4), group=group,
                                      max_new_tokens=budgets))
    resizes = [k[1:] for k in smp._fns if k[0] == "resize"]
    assert any(new_rows < rows for rows, _, new_rows, _ in resizes), resizes  # compacted
    assert any(new_slots > slots for _, slots, _, new_slots in resizes), resizes  # grown
    for field in ("tokens", "mask", "stop_reason", "steps", "top_ids"):
      np.testing.assert_array_equal(getattr(out, field), getattr(ref, field), err_msg=field)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    np.testing.assert_allclose(out.top_logprobs, ref.top_logprobs, atol=1e-5)
    tf = teacher_forced_logp(params, cfg, out, group, 0.7)
    assert np.abs(out.logprobs - tf)[out.mask].max() <= 1e-5


def _intended(logits, temperature, top_k, top_p):
  """Independent numpy restatement of the filtered sampling distribution."""
  x = logits.astype(np.float64) / temperature
  keep = np.ones_like(x, bool)
  if top_k:
    keep &= x >= np.sort(x)[-top_k]
  p = np.exp(x - x.max()) * keep
  p /= p.sum()
  order = np.argsort(-p)
  before = np.cumsum(p[order]) - p[order]
  nucleus = np.zeros_like(keep)
  nucleus[order[before < top_p]] = True
  p = p * nucleus
  return p / p.sum(), nucleus


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 0, 0.7),
                                                     (1.3, 12, 1.0), (0.9, 20, 0.8)])
def test_sampling_distribution(qwen, temperature, top_k, top_p):
  cfg, params = qwen
  prompt = [3, 1, 4, 1, 5, 9, 2, 6]
  logits = np.asarray(model.forward(params, np.array([prompt], np.int32), cfg))[0, -1]
  p, nucleus = _intended(logits, temperature, top_k, top_p)
  n = 4096
  sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1)
  out = sampler.Sampler(cfg).generate(params, [prompt], sp, jax.random.key(3), group=n)
  first = np.asarray(out.tokens)[:, 0]
  assert nucleus[first].all(), "emitted a token outside top-k / the nucleus"
  counts = np.bincount(first, minlength=cfg.vocab_size)[nucleus]
  expected = p[nucleus] * n
  # Pool rare cells so the chi-square approximation holds.
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
  pvalue = scipy.stats.chisquare(obs, exp).pvalue
  tv = 0.5 * np.abs(counts / n - p[nucleus]).sum()
  assert pvalue > 1e-3 and tv < 0.1, (pvalue, tv)


@pytest.mark.slow
def test_sharded_same_tokens_as_single_device(qwen):
  cfg, params = qwen
  sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, eos_id=3)
  ref = sampler.Sampler(cfg).generate(params, PROMPTS * 2 + PROMPTS[:2], sp,
                                      jax.random.key(7), group=2)
  for shape in [(8, 1, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(shape)
    sharded = jax.device_put(params, sharding.tree_shardings(model.param_axes(cfg), params, mesh))
    out = sampler.Sampler(cfg, mesh).generate(sharded, PROMPTS * 2 + PROMPTS[:2], sp,
                                              jax.random.key(7), group=2)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


@pytest.mark.slow
def test_decode_mesh_of_its_own_keeps_the_logprob_identity(qwen):
  """Weights on the trainer's (1, 4, 2) mesh, decoded on a (2, 1, 4) regrouping of the same
  chips (tensor-parallel groups of 4, rows over 2): the sampler's tokens are one device's, its
  logprobs equal the trainer's teacher-forced ones and the reference path's on the trainer's
  mesh (the samples packed)."""
  cfg, params = qwen
  prompts, key, group = PROMPTS * 2 + PROMPTS[:2], jax.random.key(3), 2
  sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, eos_id=3)
  ref = sampler.Sampler(cfg).generate(params, prompts, sp, key, group=group)
  train = sharding.make_mesh((1, 4, 2))
  decode_mesh = sharding.regroup(train, (2, 1, 4))
  assert list(decode_mesh.devices.flat) == list(train.devices.flat)
  placed = jax.device_put(params, sharding.tree_shardings(model.param_axes(cfg), params, train))
  decoder = sampler.Sampler(cfg, decode_mesh)
  with pytest.MonkeyPatch.context() as m:  # one program moves and lays out: no device_put
    m.setattr(jax, "device_put", lambda *a, **k: pytest.fail("weights moved outside the program"))
    q = decoder.decode_weights(placed)["layers"][0]["q"]  # (D, H, h): heads over 4-chip groups
  assert decoder.compilations() == 1
  assert q.sharding.mesh.shape == decode_mesh.shape
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2])
  out = decoder.generate(placed, prompts, sp, key, group=group)
  assert out.tokens.sharding.mesh.shape == decode_mesh.shape  # the rows live on the decode mesh
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  mask = np.asarray(out.mask)
  want = teacher_forced_logp(params, cfg, out, group, 0.7)
  assert np.abs(np.asarray(out.logprobs) - want)[mask].max() <= 1e-5
  logp = LogProbs(cfg, GRPOConfig(group_size=group, temperature=0.7), train)
  host = jax.device_get(out)  # the RL loop's reference forward: the samples packed
  batch = RolloutBatch(np.concatenate([np.repeat(host.prompt_tokens, group, 0), host.tokens], 1),
                       np.concatenate([np.repeat(host.prompt_mask, group, 0), host.mask], 1),
                       host.mask, host.logprobs, np.zeros(len(host.mask), np.float32))
  trainer_view = logp.of_batch(placed, batch).get()
  assert np.abs(trainer_view - np.asarray(out.logprobs))[mask].max() <= 1e-5


def test_decode_weights_from_another_device_order_or_the_host(qwen):
  """One program needs the sampler's devices in its order: params on the same chips in
  another order, or on the host, are put on the mesh first; every way gives the same decode
  weights, laid out on the sampler's mesh."""
  cfg, params = qwen
  devices = jax.devices()
  decode_mesh = sharding.make_mesh((2, 1, 4), devices=devices[::-1])
  axes = model.param_axes(cfg)
  reordered = jax.device_put(params, sharding.tree_shardings(
      axes, params, sharding.make_mesh((1, 8, 1), devices=devices)))
  in_order = jax.device_put(params, sharding.tree_shardings(
      axes, params, sharding.regroup(decode_mesh, (1, 8, 1))))
  outs = [sampler.Sampler(cfg, decode_mesh).decode_weights(p)
          for p in (reordered, in_order, params)]
  for got in outs:
    q = got["layers"][0]["q"]
    assert list(q.sharding.mesh.devices.flat) == devices[::-1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(outs[0])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_compiles_once_per_bucket(qwen, monkeypatch):
  cfg, params = qwen
  monkeypatch.setattr(sampler, "_DECODE_PROGRAMS", {})  # none compiled by other tests
  s = sampler.Sampler(cfg, min_bucket=16)
  sp = SamplingParams(temperature=1.0, max_new_tokens=4)
  rng = np.random.default_rng(0)
  for i in range(12):  # lengths 1..40: buckets 16, 32, 64, each hit several times
    n = [1, 5, 16, 17, 30, 32, 33, 40, 2, 20, 39, 8][i]
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for _ in range(2)]
    s.generate(params, prompts, sp, jax.random.key(i))
  # One prefill and one decode segment per prompt bucket (a 4-token budget fits the first
  # cache window; 2 rows are too few to compact), each compiled once.
  kinds = [k[0] for k in s._fns]
  assert kinds.count("prefill") == 3 and kinds.count("segment") == 3, kinds
  assert "resize" not in kinds
  assert all(f._cache_size() == 1 for k, f in s._fns.items() if k[0] != "fuse")
  assert all(f.program._cache_size() == 1 for k, f in s._fns.items() if k[0] != "fuse")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [0, 2])
def test_samplers_of_one_model_share_their_decode_programs(qwen, monkeypatch, devices):
  """A second sampler of the same model, mesh and window (a pipeline's next stage) samples
  what the first did with the first's programs: nothing traced or compiled again. Its
  `compilations()` still counts what it needed; another window gets programs of its own."""
  cfg, params = qwen
  monkeypatch.setattr(sampler, "_DECODE_PROGRAMS", {})
  mesh = sharding.make_mesh((devices, 1, 1), jax.devices()[:devices]) if devices else None
  sp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, eos_id=3)
  run = lambda s: s.generate(params, PROMPTS * 3, sp, jax.random.key(5), group=4)
  first = sampler.Sampler(cfg, mesh, window=8, min_rows=4)
  out = run(first)
  programs = dict(sampler._DECODE_PROGRAMS)
  compiled = {k: p._cache_size() for k, p in programs.items()}
  assert any(k[3][0] == "resize" for k in programs)  # rows compacted, the cache grown
  second = sampler.Sampler(cfg, mesh, window=8, min_rows=4)
  again = run(second)
  assert sampler._DECODE_PROGRAMS == programs
  assert {k: p._cache_size() for k, p in programs.items()} == compiled
  # …plus the program that lays the weights out, one per sampler
  assert second.compilations() == first.compilations() == len(programs) + 1
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  run(sampler.Sampler(cfg, mesh, window=16, min_rows=4))
  assert len(sampler._DECODE_PROGRAMS) > len(programs)


@pytest.mark.slow
def test_budgets_stops_and_early_exit(qwen):
  cfg, params = qwen
  smp = sampler.Sampler(cfg)
  sp = SamplingParams(temperature=1.0, max_new_tokens=10)
  out = smp.generate(params, PROMPTS, sp, jax.random.key(0), max_new_tokens=[1, 3, 6])
  np.testing.assert_array_equal(np.asarray(out.mask).sum(1), [1, 3, 6])
  assert int(out.steps) == 6  # the loop stopped once the last budget ran out
  assert np.all(np.asarray(out.stop_reason) == sampler.STOP_LENGTH)
  # EOS on the greedy first token: every row stops at step one.
  greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
  first = np.asarray(smp.generate(params, PROMPTS[:1], greedy, jax.random.key(0)).tokens)[0, 0]
  out = smp.generate(params, PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=10,
                                                         eos_id=int(first)), jax.random.key(0))
  assert int(out.steps) == 1 and int(out.stop_reason[0]) == sampler.STOP_EOS


@pytest.mark.slow
def test_deterministic_per_key(qwen):
  cfg, params = qwen
  smp = sampler.Sampler(cfg)
  sp = SamplingParams(temperature=1.0, max_new_tokens=8)
  a = smp.generate(params, PROMPTS, sp, jax.random.key(5), group=2)
  b = smp.generate(params, PROMPTS, sp, jax.random.key(5), group=2)
  c = smp.generate(params, PROMPTS, sp, jax.random.key(6), group=2)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  # The G samples of one prompt differ from each other.
  assert not np.array_equal(np.asarray(a.tokens)[0], np.asarray(a.tokens)[1])


def test_bad_input(qwen):
  cfg, params = qwen
  smp = sampler.Sampler(cfg, max_prompt_len=32)
  sp = SamplingParams(max_new_tokens=4)
  with pytest.raises(ValueError, match="prompt 1 has 40 tokens, over max_prompt_len=32"):
    smp.generate(params, [[1], [2] * 40], sp, jax.random.key(0))
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    smp.generate(params, [[]], sp, jax.random.key(0))
  with pytest.raises(ValueError, match="outside"):
    smp.generate(params, [[1, cfg.vocab_size]], sp, jax.random.key(0))
  with pytest.raises(ValueError, match="exceeds the model's max_position"):
    smp.generate(params, [[1]], SamplingParams(max_new_tokens=cfg.max_position), jax.random.key(0))
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)


@pytest.mark.slow
def test_multi_token_stop_sequences(qwen):
  """A row ends on the token completing a stop sequence; everything before is unchanged."""
  cfg, params = qwen
  base = SamplingParams(temperature=1.0, max_new_tokens=24, pad_id=0)
  smp = sampler.Sampler(cfg)
  free = smp.generate(params, PROMPTS, base, jax.random.key(5), group=2)
  toks = np.asarray(free.tokens)
  # Stop sequences taken from the free run: a 3-token window of row 0 and a
  # 2-token window of row 3, so they are known to occur.
  seq_a, seq_b = tuple(toks[0, 5:8]), tuple(toks[3, 10:12])
  sp = dataclasses.replace(base, stop_ids=(seq_a, seq_b, 999))
  assert sp.stop_ids == (seq_a, seq_b, (999,))
  out = smp.generate(params, PROMPTS, sp, jax.random.key(5), group=2)
  got, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for r in range(toks.shape[0]):
    ends = [j + 1 for j in range(toks.shape[1]) for q in (seq_a, seq_b, (999,))
            if j + 1 >= len(q) and tuple(toks[r, j + 1 - len(q):j + 1]) == q]
    n = min(ends, default=toks.shape[1])
    assert mask[r].sum() == n, (r, n, mask[r].sum())
    np.testing.assert_array_equal(got[r, :n], toks[r, :n])  # same draws up to the stop
    assert np.all(got[r, n:] == 0)
    assert int(out.stop_reason[r]) == (sampler.STOP_STOP if ends else sampler.STOP_LENGTH)
  assert int(out.stop_reason[0]) == sampler.STOP_STOP and mask[0].sum() <= 8


class _LossyTokenizer:
  """Encodes every string to the same ids: nothing round-trips."""

  def token_id(self, piece):
    return None

  def encode(self, text):
    return [5, 6] if text else []

  def decode(self, ids):
    return "something else"


def test_stop_sequences_reject_bad_input():
  for stop in ("</answer>", ""):
    with pytest.raises(ValueError, match="round-trip"):
      sampler.stop_token_ids(_LossyTokenizer(), [stop])
  with pytest.raises(ValueError, match="non-empty"):
    SamplingParams(stop_ids=((),))
  with pytest.raises(ValueError, match="token ids >= 0"):
    SamplingParams(stop_ids=((3, -1),))


def test_decode_plan_buckets():
  """Row buckets halve while they divide over the data shards; the cache doubles when
  full, capped at prompt + budget; a segment stops once live rows fit the next bucket."""
  from r1jax.generation import decode
  assert decode.row_buckets(64, 2, 8) == (64, 48, 32, 24, 16, 12, 8)
  assert decode.row_buckets(24, 4, 3) == (24, 12)  # 6 rows would not divide over 4 shards
  assert decode.row_buckets(6, 1, 8) == (6,)
  buckets = (64, 32, 16, 8)
  assert [decode.next_floor(r, buckets) for r in buckets] == [32, 16, 8, 0]
  # (live, t) -> (rows, slots) from 64 rows over 32 + 128 slots, budget 1024.
  assert decode.next_shape(40, 50, 64, 160, 32, buckets, 128, 1024) == (64, 160)
  assert decode.next_shape(30, 50, 64, 160, 32, buckets, 128, 1024) == (32, 160)
  assert decode.next_shape(30, 128, 32, 160, 32, buckets, 128, 1024) == (32, 288)
  assert decode.next_shape(3, 512, 16, 544, 32, buckets, 128, 1024) == (8, 1056)
  assert decode.next_shape(3, 900, 8, 1056, 32, buckets, 128, 1000) == (8, 1056)
