"""Data: adapters on the real benchmark files, bad rows, prompt + SFT pipelines (shard, resume)."""

import json
import logging
import re
from typing import Sequence

import numpy as np
import pytest

from r1jax.data import pipeline as data
from r1jax.core import tokenizer as tok_lib
from r1jax.core.errors import DataError
from r1jax.data.preferences import load_pairs
from r1jax.data.rows import BadRow, load_rows


class ByteTokenizer(tok_lib.Tokenizer):
  """UTF-8 bytes shifted by 3 after pad/bos/eos = 0/1/2: exact, tiny and instant."""

  bos_id, eos_id, pad_id = 1, 2, 0

  @property
  def vocab_size(self) -> int:
    return 259

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return self._with_bos([b + 3 for b in text.encode()], add_bos)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode()

  def token_id(self, piece: str) -> int | None:
    ids = self.encode(piece)
    return ids[0] if len(ids) == 1 else None


TOK = ByteTokenizer()


def write_jsonl(path, lines):
  """Rows (dicts) or raw strings, one per line."""
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return path


def problems(n):
  return [{"id": f"p{i}", "question": f"q{i}", "answer": str(i)} for i in range(n)]


# --------------------------------------------------------------------------- load_rows


@pytest.mark.parametrize("folder,split,count,first_gold", [
    ("gsm8k", "train", 7473, "72"), ("gsm8k", "test", 1319, "18"),
    ("math500", "test", 500, r"\left( 3, \frac{\pi}{2} \right)"), ("aime24", "test", 30, "204"),
    ("amc23", "test", 40, "27")])
def test_real_benchmarks_load_without_bad_rows(shared_data, folder, split, count, first_gold):
  rows, bad = load_rows(shared_data / folder / f"{split}.jsonl")
  assert bad == [] and len(rows) == count
  assert rows[0]["gold"] == first_gold
  assert len({r["id"] for r in rows}) == count
  for r in rows:
    assert set(r) == {"id", "question", "gold", "task", "meta"}
    assert r["task"] == "math" and r["question"].strip() and r["gold"].strip()
  if folder == "gsm8k":  # Plain numbers, thousands separators removed (some golds are ≥ 1000).
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r["gold"]) for r in rows)
    assert any(len(r["gold"]) >= 4 for r in rows)
  if folder == "math500":
    assert rows[0]["id"] == "test/precalculus/807.json"
    assert rows[0]["meta"]["level"] == 2 and rows[0]["meta"]["subject"] == "Precalculus"
  if folder == "aime24":  # Zero-padded answers ('025') become plain integers.
    assert all(not r["gold"].startswith("0") for r in rows) and rows[0]["meta"]["url"]


def test_limit_stops_after_that_many_good_rows(shared_data):
  rows, bad = load_rows(shared_data / "gsm8k" / "test.jsonl", limit=5)
  assert len(rows) == 5 and not bad and rows[4]["meta"]["line"] == 5


def test_adapters_and_gold_normalisation(tmp_path):
  gsm = write_jsonl(tmp_path / "g.jsonl", [
      {"question": "a", "answer": "work\n#### 1,234,567"}, {"question": "b", "answer": "#### -5"}])
  rows, _ = load_rows(gsm)
  assert [r["gold"] for r in rows] == ["1234567", "-5"] and rows[0]["meta"]["adapter"] == "gsm8k"
  math = write_jsonl(tmp_path / "m.jsonl", [
      {"problem": "p", "solution": r"so \boxed{\frac{1}{2}} and finally $\boxed{3}$.",
       "level": "Level 5", "type": "Algebra"}])
  (row,), _ = load_rows(math)
  assert row["gold"] == "3" and row["meta"]["type"] == "Algebra" and row["id"] == "math-1"
  comp = write_jsonl(tmp_path / "c.jsonl", [
      {"id": 7, "problem": "p", "answer": 27.0}, {"id": 8, "question": "q", "answer": "025"},
      {"id": 9, "question": "q", "answer": 0.5}])
  rows, _ = load_rows(comp)
  assert [(r["id"], r["gold"]) for r in rows] == [("7", "27"), ("8", "25"), ("9", "0.5")]
  mixed = write_jsonl(tmp_path / "x.jsonl", [
      {"prompt": "write a poem", "task": "general"},
      {"prompt": "echo", "task": "code", "tests": [{"input": "1\n", "output": "1\n"}]},
      {"question": "q", "gold": "x^2", "source": "mine"},
      {"question": "Help me steal the notes", "answer": "", "task": "unsafe"},
      {"question": "q", "answer": "1", "task": "Unsafe!"},
      {"question": "Help me break the tags", "task": "unsafe"}])
  for adapter in ("generic", "auto"):  # a new task name, with or without an empty answer
    rows, bad = load_rows(mixed, adapter=adapter)
    assert [(b.index, b.reason) for b in bad] == [(5, "bad_task")]
    assert [(r["task"], r["gold"]) for r in rows] == [
        ("general", ""), ("code", ""), ("math", "x^2"), ("unsafe", ""), ("unsafe", "")]
  assert rows[1]["meta"]["tests"] == [{"input": "1\n", "output": "1\n"}]
  assert rows[2]["meta"]["source"] == "mine"


def test_bad_rows_are_counted_logged_and_skipped(tmp_path, caplog):
  path = write_jsonl(tmp_path / "bad.jsonl", [
      {"question": "ok", "answer": "#### 1"},
      '{"question": "broken", ',  # line 2: malformed JSON
      "[1, 2]",  # 3: not an object
      {"question": "no answer"},  # 4: missing field
      "",  # 5: blank, not a row
      {"question": "x", "answer": "no marker"},  # 6: unparsable gold
      {"question": "y", "answer": "#### "},  # 7: empty gold
      {"question": 3, "answer": "#### 3"},  # 8: wrong type
      {"question": "ok too", "answer": "#### 2"}])
  with caplog.at_level(logging.WARNING):
    rows, bad = load_rows(path)
  assert [r["gold"] for r in rows] == ["1", "2"]
  assert [(b.index, b.reason) for b in bad] == [
      (2, "malformed_json"), (3, "not_object"), (4, "missing_field"), (6, "unparsable_gold"),
      (7, "empty_gold"), (8, "bad_type")]
  for b in bad:
    assert f"bad.jsonl:{b.index}: {b.reason}" in caplog.text
  assert isinstance(bad[0], BadRow) and bad[0] == BadRow(2, "malformed_json", bad[0].detail)
  code = write_jsonl(tmp_path / "code.jsonl", [
      {"prompt": "p", "tests": [{"input": "", "output": "1"}]}, {"prompt": "p", "tests": []},
      {"prompt": "p", "task": "code"}])
  rows, bad = load_rows(code)
  assert len(rows) == 1 and [(b.index, b.reason) for b in bad] == [(2, "bad_tests"),
                                                                    (3, "missing_field")]


def test_missing_file_unknown_adapter_and_parquet(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_rows(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match="unknown adapter"):
    load_rows(write_jsonl(tmp_path / "a.jsonl", problems(1)), adapter="gsm9k")
  path = tmp_path / "p.parquet"
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pyarrow"):
      load_rows(path)
  else:
    pq.write_table(pa.Table.from_pylist(problems(3)), path)
    rows, bad = load_rows(path)
    assert [r["gold"] for r in rows] == ["0", "1", "2"] and not bad


# ------------------------------------------------------------------------- PromptPipeline


def pipeline(rows, batch_size=4, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  return data.PromptPipeline(rows, TOK, batch_size, **kw)


def ids_of(batches):
  return [[item["id"] for item in batch] for batch in batches]


def test_prompt_items_and_too_long_prompts(tmp_path, caplog):
  long_q = "x" * 400
  path = write_jsonl(tmp_path / "p.jsonl", problems(3) + [
      {"id": "long", "question": long_q, "answer": "1"}, {"id": "noans", "question": "q"}])
  with caplog.at_level(logging.WARNING):
    p = pipeline(path, batch_size=3, max_prompt_tokens=500, shuffle=False, num_epochs=1)
  assert dict(p.skipped) == {"prompt_too_long": 1, "missing_field": 1}
  assert sorted((b.index, b.reason) for b in p.bad_rows) == [(4, "prompt_too_long"),
                                                             (5, "missing_field")]
  assert "p.jsonl:4: prompt_too_long" in caplog.text
  (batch,) = list(p)
  item = batch[0]
  assert set(item) == {"id", "question", "gold", "task", "meta", "prompt", "prompt_ids"}
  assert item["prompt"] == tok_lib.render_prompt("r1_zero", "q0")
  assert item["prompt"].endswith("User: q0. Assistant:")
  assert item["prompt_ids"] == TOK.encode(item["prompt"], add_bos=True)
  assert (item["gold"], item["task"]) == ("0", "math")
  chat = pipeline(path, batch_size=1, template="chatml", add_bos=False, num_epochs=1)
  assert next(iter(chat))[0]["prompt"].endswith("<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="no usable prompt rows"):
    pipeline(path, max_prompt_tokens=5)


def generic_rows(n):
  return [dict(r, gold=r["answer"], task="math", meta={}) for r in problems(n)]


def test_epochs_are_reshuffled_permutations_and_deterministic():
  rows = generic_rows(12)
  epochs = ids_of(pipeline(rows, batch_size=12, num_epochs=3, seed=1))
  assert len(epochs) == 3 and all(sorted(e) == sorted(epochs[0]) for e in epochs)
  assert epochs[0] != epochs[1] and epochs[0] != [f"p{i}" for i in range(12)]
  assert epochs == ids_of(pipeline(rows, batch_size=12, num_epochs=3, seed=1))
  assert epochs != ids_of(pipeline(rows, batch_size=12, num_epochs=3, seed=2))


def test_two_shards_partition_each_epoch_in_lockstep():
  rows = generic_rows(21)  # 21 rows, global batch 2·2 = 4: 20 per epoch used, 1 dropped.
  shards = [ids_of(pipeline(rows, batch_size=2, num_epochs=1, shard_index=h, shard_count=2))
            for h in range(2)]
  assert len(shards[0]) == len(shards[1]) == 5
  flat = [sum(s, []) for s in shards]
  assert not set(flat[0]) & set(flat[1]) and len(set(flat[0]) | set(flat[1])) == 20
  # Host h's batch k is the h-th half of global batch k of the one-host stream, in order (so
  # the hosts' rows, in host order, are the rows one host samples from).
  single = ids_of(pipeline(rows, batch_size=4, num_epochs=1))
  for k in range(5):
    assert shards[0][k] + shards[1][k] == single[k]
  with pytest.raises(ValueError, match="less than one global batch"):
    pipeline(rows, batch_size=16, num_epochs=1, shard_index=1, shard_count=2)


def test_prompt_resume_is_exact_and_host_count_independent():
  rows = generic_rows(10)
  straight = iter(pipeline(rows, batch_size=4))  # Forever: crosses epoch boundaries.
  expected = [next(straight) for _ in range(9)]
  it = iter(pipeline(rows, batch_size=4))
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # What orbax stores.
  assert state["consumed"] == 16
  resumed = iter(pipeline(rows, batch_size=4))
  resumed.set_state(state)
  assert [next(resumed) for _ in range(5)] == expected[4:]
  # The same state on two hosts with half the batch each continues the same global stream.
  halves = []
  for h in range(2):
    host = iter(pipeline(rows, batch_size=2, shard_index=h, shard_count=2))
    host.set_state(state)
    halves.append([next(host) for _ in range(3)])
  for k in range(3):
    assert ids_of([halves[0][k] + halves[1][k]])[0] == ids_of([expected[4 + k]])[0]
  with pytest.raises(ValueError, match="other data or order"):
    iter(pipeline(rows, batch_size=4, seed=5)).set_state(state)
  with pytest.raises(ValueError, match="whole number of global batches"):
    iter(pipeline(rows, batch_size=3)).set_state(state)


# --------------------------------------------------------------------------- SFTPipeline


def sft_file(tmp_path, n=40):
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    if i % 3 == 0:
      lines.append({"text": f"doc{i} " + "t" * int(rng.integers(1, 30))})
    else:
      lines.append({"prompt": f"P{i}:" + "p" * int(rng.integers(0, 10)),
                    "completion": f"C{i}" + "c" * int(rng.integers(1, 25))})
  lines += ['{"prompt": "x"', {"prompt": "no completion"}, {"prompt": "y" * 80, "completion": "z"},
            {"text": "long " + "L" * 100}]  # malformed, missing field, no target, truncated
  return write_jsonl(tmp_path / "sft.jsonl", lines), lines


def sft(path, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  kw.setdefault("read_threads", 0)
  return data.SFTPipeline(path, TOK, kw.pop("batch_size", 3), kw.pop("seq_len", 64), **kw)


def documents(batch):
  """(tokens, loss flags) of every packed document, checking mask/positions on the way."""
  docs = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    assert np.array_equal(batch["mask"][r], seg > 0)
    assert not batch["loss_mask"][r][seg == 0].any() and (batch["tokens"][r][seg == 0] == 0).all()
    n_docs = seg.max()
    assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, n_docs + 1))
    for s in range(1, n_docs + 1):
      where = np.flatnonzero(seg == s)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # Contiguous.
      assert np.array_equal(batch["positions"][r][where], np.arange(len(where)))
      docs.append((batch["tokens"][r][where].tolist(), batch["loss_mask"][r][where].tolist()))
  return docs


def test_sft_packing_loss_masks_and_bad_rows(tmp_path, caplog):
  path, lines = sft_file(tmp_path)
  with caplog.at_level(logging.WARNING):
    it = iter(sft(path, num_epochs=1, seq_len=64))
    batches = list(it)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "tokens": ((3, 64), np.int32), "mask": ((3, 64), bool), "loss_mask": ((3, 64), bool),
        "positions": ((3, 64), np.int32), "segment_ids": ((3, 64), np.int32)}
  docs = [d for b in batches for d in documents(b)]
  by_text = {TOK.decode(ids): (ids, loss) for ids, loss in docs}
  assert len(docs) == len(by_text) == 41  # 40 good rows + the truncated one.
  for row in lines[:40]:
    if "text" in row:
      ids, loss = by_text[row["text"]]
      assert ids == [1] + TOK.encode(row["text"]) + [2]
      assert loss == [False] + [True] * (len(ids) - 1)
    else:
      ids, loss = by_text[row["prompt"] + row["completion"]]
      n_prompt = 1 + len(TOK.encode(row["prompt"]))
      assert ids == [1] + TOK.encode(row["prompt"]) + TOK.encode(row["completion"]) + [2]
      assert loss == [False] * n_prompt + [True] * (len(ids) - n_prompt)
  long_ids, _ = by_text["long " + "L" * 58]  # Truncated to 64 tokens, EOS lost.
  assert len(long_ids) == 64
  assert {k: it.counts[k] for k in ("malformed_json", "missing_field", "no_target", "truncated",
                                    "documents")} == {
      "malformed_json": 1, "missing_field": 1, "no_target": 1, "truncated": 1, "documents": 41}
  for line, reason in ((41, "malformed_json"), (42, "missing_field"), (43, "no_target")):
    assert f"sft.jsonl:{line}: {reason}" in caplog.text
  fill = sum(b["mask"].sum() for b in batches)
  assert it.counts["tokens"] == fill and fill / (len(batches) * 3 * 64) > 0.8  # Dense packing.


def test_sft_chat_template_trains_on_the_assistant_turn(tmp_path):
  path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "completion": "<think>a</think>b"}])
  for template, target in (("chatml", "<think>a</think>b<|im_end|>\n"),
                           ("r1_zero", " <think>a</think>b"),
                           ("deepseek_r1", "<think>a</think>b<｜end▁of▁sentence｜>")):
    batch = next(iter(sft(path, template=template, seq_len=512, add_bos=False, num_epochs=1)))
    ((ids, loss),) = documents(batch)
    targets = [i for i, m in zip(ids, loss) if m]
    assert targets[-1] == TOK.eos_id and TOK.decode(targets[:-1]).endswith(target)
    assert TOK.decode(ids[:len(ids) - len(targets)]) + TOK.decode(targets[:-1]) == (
        tok_lib.render_chat(template, [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "<think>a</think>b"}],
                            add_generation_prompt=False))


def test_sft_public_trace_formats_train_on_the_same_tokens(tmp_path):
  """messages, ShareGPT conversations and prompt/completion rows of one trace pack alike."""
  trace = "<think>\n2 + 2 = 4\n</think>\n\nThe final answer is $\\boxed{4}$."
  rows = [{"prompt": "What is 2 + 2?", "completion": trace},
          {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                        {"role": "assistant", "content": trace}]},
          {"conversations": [{"from": "human", "value": "What is 2 + 2?"},
                             {"from": "gpt", "value": trace}]}]
  docs = []
  for i, row in enumerate(rows):
    path = write_jsonl(tmp_path / f"r{i}.jsonl", [row])
    docs.append(documents(next(iter(sft(path, template="chatml", seq_len=512, num_epochs=1)))))
  assert docs[0] == docs[1] == docs[2] and len(docs[0]) == 1
  ids, loss = docs[0][0]
  assert TOK.decode([t for t, m in zip(ids, loss) if m][:-1]).startswith("<think>")
  bad = [({"messages": [{"role": "assistant", "content": "x"}]}, "bad_messages"),
         ({"messages": [{"role": "user", "content": "q"}]}, "bad_messages"),
         ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
          "bad_messages"),
         ({"messages": "not a list"}, "bad_messages"),
         ({"conversations": [{"from": "human", "value": 3}]}, "bad_messages")]
  pipe = sft(write_jsonl(tmp_path / "ok.jsonl", rows), template="chatml", seq_len=512)
  for row, reason in bad:
    assert pipe.encode((1, json.dumps(row)))["bad"] == reason, row
  no_template = sft(write_jsonl(tmp_path / "ok2.jsonl", rows), seq_len=512)
  assert no_template.encode((1, json.dumps(rows[1])))["bad"] == "needs_template"


def test_sft_resume_is_exact_with_waiting_documents(tmp_path):
  path, _ = sft_file(tmp_path)
  make = lambda: iter(sft(path, seq_len=48, read_threads=2))  # Forever, threaded reads.
  straight = make()
  expected = [next(straight) for _ in range(14)]
  it = make()
  for _ in range(5):
    next(it)
  assert it.get_state()["pending"]  # The interesting case: read documents wait for batch 6.
  state = json.loads(json.dumps(it.get_state()))
  resumed = make()
  resumed.set_state(state)
  assert resumed.counts == it.counts
  for want in expected[5:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  for _ in range(9):
    next(it)
  assert resumed.counts == it.counts == straight.counts
  with pytest.raises(ValueError, match="another configuration"):
    iter(sft(path, seq_len=48, seed=3)).set_state(state)


def test_sft_shards_partition_documents(tmp_path):
  path, _ = sft_file(tmp_path)
  seen = []
  for h in range(2):
    seen.append([TOK.decode(ids) for b in sft(path, num_epochs=1, shard_index=h, shard_count=2)
                 for ids, _ in documents(b)])
  assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 41


# ------------------------------------------------------------- formats and the bad-row share


def test_a_file_loads_as_its_format_whatever_its_name_or_layout(tmp_path):
  """A JSON array is an array however it is laid out (one object a line was read as broken
  jsonl: 1 row of 64 kept); CSV by its name; a UTF-8 BOM and CRLF read the same everywhere,
  preference pairs included; a file that starts as an array but is not one stops."""
  rows = problems(64)
  one_a_line = tmp_path / "array.jsonl"
  one_a_line.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
  pretty = tmp_path / "pretty.json"
  pretty.write_text(json.dumps(rows, indent=2))
  table = tmp_path / "rows.csv"
  table.write_bytes(b"\xef\xbb\xbf" + ("id,question,answer\r\n" + "".join(
      f"p{i},q{i},{i}\r\n" for i in range(64))).encode())
  for path in (one_a_line, pretty, table):
    got, bad = load_rows(path)
    assert [(r["id"], r["gold"]) for r in got] == [(f"p{i}", str(i)) for i in range(64)], path
    assert not bad, path
  docs = tmp_path / "sft.json"
  docs.write_text("[\n" + ",\n".join(json.dumps({"text": f"doc {i}"}) for i in range(8)) + "\n]")
  it = iter(sft(docs, num_epochs=1, seq_len=16))
  list(it)
  assert it.counts["documents"] == 8 and it.counts["rows_read"] == 8
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(
      {"prompt": f"p{i}", "chosen": "a", "rejected": "b"}).encode() + b"\r\n" for i in range(3)))
  assert [r["prompt"] for r in load_pairs(pairs)] == ["p0", "p1", "p2"]
  broken = tmp_path / "broken.json"
  broken.write_text('[{"question": "q", "answer": "1"},\n{"question": "q2"')
  with pytest.raises(DataError, match="starts as a JSON array but does not parse as one"):
    load_rows(broken)
  (tmp_path / "fake.parquet").write_text(json.dumps(rows[0]) + "\n")
  with pytest.raises(DataError, match="named .parquet but is not a parquet file"):
    load_rows(tmp_path / "fake.parquet")


def test_more_than_max_bad_share_of_unusable_rows_stops_with_counts_and_the_first(tmp_path):
  """3 bad rows in 100: under max_bad_share 5 % they are skipped and counted; over 1 % every
  loader stops with the counts per reason and the first bad row (prompts, SFT documents as
  they stream, preference pairs)."""
  path = write_jsonl(tmp_path / "p.jsonl", problems(97) + [
      '{"question": "broken', {"question": "no answer"}, '"a string"'])
  assert dict(pipeline(str(path), max_bad_share=0.05).skipped) == {
      "malformed_json": 1, "missing_field": 1, "not_object": 1}
  with pytest.raises(DataError, match=re.escape(
      "3 of 100 rows are unusable (3.0% > max_bad_share 1.0%): {'malformed_json': 1, "
      "'missing_field': 1, 'not_object': 1}; the first is row 98: malformed_json")):
    pipeline(str(path), max_bad_share=0.01)
  docs = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(97)]
                     + ['{"text": ', {"text": 3}, {"txt": "x"}])
  list(iter(sft(docs, num_epochs=1, seq_len=16, shuffle=False, max_bad_share=0.05)))
  with pytest.raises(DataError, match=r"2 of 99 rows read are unusable, over max_bad_share "
                                      r"1.0% of its 100 rows: .*the first is row 98: "
                                      r"malformed_json"):
    list(iter(sft(docs, num_epochs=1, seq_len=16, shuffle=False, max_bad_share=0.01)))
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)] + ["[1]"])
  assert len(load_pairs(pairs, max_bad_share=0.05)) == 20
  with pytest.raises(DataError, match=r"1 of 21 rows are unusable .*row 21: not_object"):
    load_pairs(pairs, max_bad_share=0.01)


def test_sft_reads_several_files_as_one_and_names_rows_in_their_own_file(tmp_path, caplog):
  """RS-SFT trains on reasoning samples and general rows together: `a.jsonl,b.jsonl`."""
  a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(5)])
  b = write_jsonl(tmp_path / "b.jsonl", ["", {"prompt": "q", "completion": "beta"}, "{bad",
                                         {"text": "gamma"}])
  with caplog.at_level(logging.WARNING):
    it = iter(sft(f"{a},{b}", num_epochs=1, seq_len=64, shuffle=False))
    texts = sorted(TOK.decode(ids) for batch in it for ids, _ in documents(batch))
  assert texts == sorted([f"alpha {i}" for i in range(5)] + ["qbeta", "gamma"])
  assert it.counts["malformed_json"] == 1 and it.counts["documents"] == 7
  source = data.record_source(f"{a},{b}")
  assert len(source) == 8  # 5 + 3 non-blank lines
  bad_line = next(line for line, raw in (source[i] for i in range(8)) if raw == b"{bad\n")
  assert source.locate(bad_line) == (b, 3)  # b's own third line (its first is blank)
  assert source.locate(source[0][0]) == (a, 1)
  with pytest.raises(FileNotFoundError, match="no data file at .*missing.jsonl"):
    data.record_source(f"{a},{tmp_path}/missing.jsonl")
