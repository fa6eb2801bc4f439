"""Tokenizers (sentencepiece trained here, HF tokenizer.json vs transformers) and templates."""

import json
import subprocess
import sys

import pytest

from r1jax.core import tokenizer as tok_lib

SAMPLES = ["Natalia sold clips to 48 of her friends in April.",
           "<think> 48 / 2 = 24 </think> <answer> 72 </answer>",
           "数学题：三加四等于七。", "x^2 + 3x - 4 = 0,  so\n\tx = 1 or x = -4"]


@pytest.fixture(scope="module")
def corpus(shared_data):
  rows = [json.loads(l) for l in (shared_data / "gsm8k" / "train.jsonl").open()][:2000]
  return [r["question"] for r in rows] + [r["answer"] for r in rows]


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
  return tok_lib.train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "spm", 512)


def test_sentencepiece_round_trip_and_specials(sp_model):
  tok = tok_lib.load_tokenizer(sp_model)
  assert tok.vocab_size == 512
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  for text in SAMPLES:  # byte fallback covers characters never seen in training
    assert tok.decode(tok.encode(text)) == text
  for special in tok_lib.REASONING_TOKENS:
    i = tok.token_id(special)
    assert i is not None and tok.encode(special) == [i]
  assert tok.token_id("<not-a-piece>") is None
  ids = tok.encode("hi", add_bos=True)
  assert ids[0] == tok.bos_id and tok.strip_specials(ids + [tok.eos_id, 0]) == ids[1:]


def test_train_tokenizer_tool(tmp_path, corpus):
  data = tmp_path / "c.jsonl"
  data.write_text("\n".join(json.dumps({"text": t}) for t in corpus[:500]))
  out = subprocess.run([sys.executable, "tools/train_tokenizer.py", f"--input={data}",
                        "--vocab_size=600", f"--out={tmp_path / 'tok'}"],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["vocab_size"] == 600
  bad = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input=missing.txt",
                        f"--out={tmp_path / 'x'}"], capture_output=True, text=True)
  assert bad.returncode != 0 and "missing.txt does not exist" in bad.stderr


@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
  """A byte-level BPE tokenizer.json saved through transformers (the reference)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  import transformers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<|endoftext|>", "<s>", *tok_lib.REASONING_TOKENS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>",
                                              eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
  folder = tmp_path_factory.mktemp("hf_tok")
  fast.save_pretrained(folder)
  return folder


def test_hf_tokenizer_matches_transformers(hf_folder):
  import transformers
  ref = transformers.AutoTokenizer.from_pretrained(hf_folder)
  tok = tok_lib.load_tokenizer(hf_folder)
  assert tok.vocab_size == len(ref)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                 ref.pad_token_id)
  for text in SAMPLES:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids) == text
  assert tok.encode("</answer>") == [tok.token_id("</answer>")]


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer at"):
    tok_lib.load_tokenizer(tmp_path)


def test_templates():
  p = tok_lib.render_prompt("r1_zero", "What is 2+3?")
  assert p.startswith("A conversation between User and Assistant.")
  assert p.endswith("User: What is 2+3?. Assistant:")
  assert "<think> </think> and <answer> </answer>" in p
  chat = tok_lib.render_prompt("chatml", "hi")
  assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  sft = tok_lib.render_chat("llama3", [{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": "b"}],
                            add_generation_prompt=False)
  assert sft.startswith("<|begin_of_text|>") and sft.endswith("b<|eot_id|>")
  with pytest.raises(ValueError, match="unknown template"):
    tok_lib.render_prompt("nope", "x")
  with pytest.raises(ValueError, match="no system turn"):
    tok_lib.render_prompt("r1_zero", "x", system="be brief")


def test_answer_stops_match_in_context_with_byte_level_bpe(corpus):
  """Without '</answer>' as a special token (Qwen-like), ANSWER_STOPS still catch the tag.

  Both forms are multi-token; after a number the bare form appears verbatim in
  the completion's ids, after a space the spaced form does (a larger vocabulary
  merges ' </' into one token, so the bare form alone would miss it there).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from r1jax.generation.sampler import stop_token_ids
  from r1jax.stages.rl import ANSWER_STOPS
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = tok_lib.HFTokenizer.__new__(tok_lib.HFTokenizer)
  tok.tok = t
  bare, spaced = stop_token_ids(tok, ANSWER_STOPS)
  assert len(bare) > 1 and len(spaced) > 1 and bare != spaced

  def contains(ids, seq):
    return any(tuple(ids[i:i + len(seq)]) == seq for i in range(len(ids)))

  assert contains(tok.encode("<think> 6 * 7 </think> <answer>42</answer>"), bare)
  assert contains(tok.encode("<think> 6 * 7 </think> <answer> 42 </answer>"), spaced)
