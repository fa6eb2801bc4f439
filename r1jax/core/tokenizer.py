"""Tokenizers (sentencepiece and HF tokenizer.json) behind one interface, and prompt templates.

Templates are data, not code: the R1-Zero template from the DeepSeek-R1 paper
(deliberately free of content bias) and the chat formats of the model
families r1jax loads.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from r1jax.core.storage import Path

REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


class Tokenizer(abc.ABC):
  """encode / decode / special ids; subclasses wrap a concrete library."""

  bos_id: int | None
  eos_id: int | None
  pad_id: int

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, added special tokens included."""

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Text -> ids, with no special tokens unless add_bos."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text, special tokens kept."""

  @abc.abstractmethod
  def token_id(self, piece: str) -> int | None:
    """The id of a single-token string (e.g. '</answer>'), else None."""

  def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
    if add_bos and self.bos_id is not None:
      return [self.bos_id] + ids
    return ids

  def strip_specials(self, ids: Sequence[int]) -> list[int]:
    """Drops pad / bos / eos ids (e.g. before decoding a completion)."""
    drop = {self.pad_id, self.bos_id, self.eos_id} - {None}
    return [int(i) for i in ids if int(i) not in drop]


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model` file."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.sp = spm.SentencePieceProcessor(model_proto=self.path.read_bytes())  # local or gs://
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
    pad = self.sp.pad_id()
    self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return self._with_bos(list(self.sp.encode(text)), add_bos)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


def _special(config: dict, key: str) -> str | None:
  value = config.get(key)
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (+ `tokenizer_config.json` for special tokens)."""

  def __init__(self, folder: str | Path):
    # Optional extra ('r1jax[hf]'): only HF tokenizer folders need it.
    from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
    folder = Path(folder)
    self.tok = RustTokenizer.from_str((folder / "tokenizer.json").read_text())
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    ids = {k: self.token_id(s) if (s := _special(config, f"{k}_token")) else None
           for k in ("bos", "eos", "pad")}
    self.bos_id, self.eos_id = ids["bos"], ids["eos"]
    self.pad_id = next(i for i in (ids["pad"], ids["eos"], 0) if i is not None)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return self._with_bos(self.tok.encode(text, add_special_tokens=False).ids, add_bos)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)


def load_tokenizer(path: str | Path) -> Tokenizer:
  """A `.model` file or a folder holding tokenizer.json or tokenizer.model."""
  path = Path(path)
  if path.is_file() and path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if (path / "tokenizer.json").exists():
    return HFTokenizer(path)
  if (path / "tokenizer.model").exists():
    return SentencePieceTokenizer(path / "tokenizer.model")
  raise FileNotFoundError(
      f"no tokenizer at {path}: expected a sentencepiece .model file, or a folder "
      "with tokenizer.json or tokenizer.model")


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int,
                        special_tokens: Sequence[str] = REASONING_TOKENS) -> Path:
  """Trains a BPE sentencepiece model with pad/unk/bos/eos = 0/1/2/3.

  The reasoning tags become single pieces, so stop tokens like '</answer>' and
  the format reward see them as one id; byte fallback keeps any text encodable.
  """
  model_prefix = Path(model_prefix)
  model_prefix.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="r1jax-spm-") as tmp:  # the trainer writes locally
    local = os.path.join(tmp, model_prefix.name)
    _train_bpe(texts, local, vocab_size, special_tokens)
    for ext in (".model", ".vocab"):
      with open(local + ext, "rb") as f:
        model_prefix.with_name(model_prefix.name + ext).write_bytes(f.read())
  return model_prefix.with_name(model_prefix.name + ".model")


def _train_bpe(texts: Iterable[str], model_prefix: str, vocab_size: int,
               special_tokens: Sequence[str]) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(t for t in texts if t), model_prefix=model_prefix,
      vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, byte_fallback=True,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=list(special_tokens),
      split_digits=True, max_sentence_length=1 << 16, num_threads=2,
      # Exact round trips: no NFKC folding, whitespace (newlines too) kept.
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      minloglevel=2)


# ------------------------------------------------------------------------- templates

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {content}. Assistant:")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A conversation format; every string formats `{content}`."""

  user: str
  assistant: str  # one finished assistant turn
  generation: str  # opens the assistant turn the model completes
  system: str = ""  # '' = this format has no system turn
  begin: str = ""  # once, before the first turn
  default_system: str = ""


TEMPLATES: dict[str, ChatTemplate] = {
    "r1_zero": ChatTemplate(user=R1_ZERO_PROMPT, assistant=" {content}", generation=""),
    "plain": ChatTemplate(user="{content}", assistant="{content}", generation=""),
    "chatml": ChatTemplate(
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        generation="<|im_start|>assistant\n",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        default_system="You are a helpful assistant."),
    "llama3": ChatTemplate(
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
        generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        begin="<|begin_of_text|>"),
    "deepseek_r1": ChatTemplate(
        user="<｜User｜>{content}", assistant="<｜Assistant｜>{content}<｜end▁of▁sentence｜>",
        generation="<｜Assistant｜><think>\n", system="{content}",
        begin="<｜begin▁of▁sentence｜>"),
}


_MARKER_RE = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜\s]+｜>")


def template_markers(template: str) -> list[str]:
  """The special tokens a chat template is written with (<|im_start|>, <｜User｜>, …)."""
  t = TEMPLATES[template]
  text = "".join([t.user, t.assistant, t.generation, t.system, t.begin])
  return sorted(set(_MARKER_RE.findall(text)))


def check_template(tokenizer: "Tokenizer", template: str, what: str = "model") -> None:
  """A model trained with a chat template has each of its markers as one token id: a
  tokenizer that splits them is not the one the template was used with (ValueError)."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
  missing = [m for m in template_markers(template) if tokenizer.token_id(m) is None]
  if missing:
    raise ValueError(f"the {what}'s tokenizer has no single id for {missing} of template "
                     f"{template!r}: it disagrees with the declared template (set the template "
                     "the model was trained with)")


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """Formats [{'role': 'system'|'user'|'assistant', 'content': str}, …] as one string."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
  t = TEMPLATES[template]
  parts = [t.begin]
  if t.default_system and t.system and not any(m["role"] == "system" for m in messages):
    parts.append(t.system.format(content=t.default_system))
  for m in messages:
    role = m.get("role")
    if role == "system" and not t.system:
      raise ValueError(f"template {template!r} has no system turn")
    if role not in ("system", "user", "assistant"):
      raise ValueError(f"unknown role {role!r} in message {m!r}")
    parts.append(getattr(t, role).format(content=m["content"]))
  if add_generation_prompt:
    parts.append(t.generation)
  return "".join(parts)


def render_prompt(template: str, question: str, system: str | None = None) -> str:
  """A single-question prompt ready for generation."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": question}]
  return render_chat(template, messages)


def tokenizer_fingerprint(path: str | Path) -> str:
  """sha1 of a tokenizer's defining files: two tokenizers with equal fingerprints share ids."""
  path = Path(path)
  files = [path] if path.is_file() else sorted(
      p for p in path.iterdir() if p.name in ("tokenizer.json", "tokenizer.model",
                                              "tokenizer_config.json", "vocab.json",
                                              "merges.txt", "added_tokens.json"))
  if not files:
    raise FileNotFoundError(f"no tokenizer files in {path}")
  h = hashlib.sha1()
  for p in files:
    h.update(p.name.encode() + b"\0" + p.read_bytes())
  return h.hexdigest()


def tokenizer_path(config) -> str:
  """A stage config's tokenizer: config.tokenizer, else the HF folder the model loads from."""
  path = config.tokenizer or config.model.get("hf_dir", "")
  if not path:
    raise ValueError("set config.tokenizer (or config.model.hf_dir for an HF tokenizer)")
  return path
