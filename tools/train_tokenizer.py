"""Trains a sentencepiece BPE model on text or jsonl files (for the tiny models).

  python tools/train_tokenizer.py --input=corpus.txt --vocab_size=1024 --out=tok/spm
"""

import json
from pathlib import Path

from absl import app, flags

from r1jax.core.tokenizer import REASONING_TOKENS, load_tokenizer, train_sentencepiece

_INPUT = flags.DEFINE_multi_string("input", None, "Text files (one sample a line) or .jsonl.")
_FIELDS = flags.DEFINE_list("fields", ["text"], "jsonl fields whose strings are used.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
_OUT = flags.DEFINE_string("out", None, "Output prefix; writes OUT.model and OUT.vocab.")
flags.mark_flags_as_required(["input", "out"])


def _texts(paths, fields):
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not path.endswith(".jsonl"):
          yield line.rstrip("\n")
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        yield from (row[k] for k in fields if isinstance(row.get(k), str))


def main(argv):
  del argv
  for path in _INPUT.value:
    if not Path(path).is_file():
      raise FileNotFoundError(f"--input {path} does not exist")
  model = train_sentencepiece(_texts(_INPUT.value, _FIELDS.value), _OUT.value, _VOCAB.value,
                              REASONING_TOKENS)
  tok = load_tokenizer(model)
  print(json.dumps({"model": str(model), "vocab_size": tok.vocab_size}))


if __name__ == "__main__":
  app.run(main)
