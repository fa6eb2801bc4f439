"""What an SFT row is: its prompt and target text, or (distillation) its ids and teacher targets.

Row formats the `sft` stage reads (jsonl or parquet, one object per row):
- {"text": str}: pretraining; every token is a target.
- {"prompt": str, "completion": str}: the completion is the target. r1jax's `generate`
  output is of this form (its other fields are ignored here); so are public R1 distillation
  sets written as prompt/completion with the reasoning in `<think>…</think>`.
- {"messages": [{"role": "system"|"user"|"assistant", "content": str}, …]}: the chat form
  public R1 traces mostly use (e.g. OpenR1-Math's `messages`); the last turn must be the
  assistant's and is the target, the turns before it the prompt. Needs `data.template`, the
  chat format both are rendered in.
  ShareGPT's {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, …]} is read as
  messages too.
- Logit distillation (`distill_top_k` > 0): rows from `generate` with output.top_k_logprobs:
  {"prompt_ids", "completion_ids", "teacher": {"top_ids", "top_logprobs", …}}; the ids are
  trained on as sampled.
Every function raises RowError (reason, detail) on a bad row; the pipeline counts and logs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r1jax.core import tokenizer as tok_lib
from r1jax.data.rows import RowError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}


def _messages(row: dict) -> list[dict] | None:
  """The row's chat turns as [{"role", "content"}], or None when it has none."""
  if "messages" in row:
    turns = row["messages"]
    key_role, key_text, roles = "role", "content", None
  elif "conversations" in row:
    turns = row["conversations"]
    key_role, key_text, roles = "from", "value", _SHAREGPT_ROLES
  else:
    return None
  if not isinstance(turns, list) or not turns:
    raise RowError("bad_messages", "must be a non-empty list of turns")
  out = []
  for t in turns:
    if not isinstance(t, dict) or not isinstance(t.get(key_text), str):
      raise RowError("bad_messages", f"each turn needs a str {key_text!r}")
    role = t.get(key_role)
    role = roles.get(role) if roles is not None else role
    if role not in ("system", "user", "assistant"):
      raise RowError("bad_messages", f"unknown role {t.get(key_role)!r}")
    out.append({"role": role, "content": t[key_text]})
  if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
    raise RowError("bad_messages", "the last turn must be a non-empty assistant turn")
  if not any(m["role"] == "user" for m in out[:-1]):
    raise RowError("bad_messages", "no user turn before the assistant's")
  return out


def _chat_texts(turns: list[dict], template: str) -> tuple[str, str]:
  """(prompt, target): the turns before the last rendered with the generation prefix, and
  the rest of the finished conversation."""
  prompt = tok_lib.render_chat(template, turns[:-1], add_generation_prompt=True)
  full = tok_lib.render_chat(template, turns, add_generation_prompt=False)
  if not full.startswith(prompt):
    # The generation prefix is not a prefix of the finished turn (deepseek_r1 opens with
    # '<think>\n'): train on the whole assistant turn after the user turn instead.
    prompt = tok_lib.render_chat(template, turns[:-1], add_generation_prompt=False)
  return prompt, full[len(prompt):]


def row_texts(row: Any, template: str | None, system: str | None) -> tuple[str, str, bool]:
  """(prompt text, target text, is_text_row) of one row."""
  if not isinstance(row, dict):
    raise RowError("bad_type", f"row is {type(row).__name__}, not an object")
  turns = _messages(row)
  if turns is not None:
    if template is None:
      raise RowError("needs_template", "chat rows need data.template (e.g. chatml)")
    if system and turns[0]["role"] != "system":
      turns = [{"role": "system", "content": system}] + turns
    return (*_chat_texts(turns, template), False)
  if "text" in row and "completion" not in row:
    text = row["text"]
    if not isinstance(text, str) or not text:
      raise RowError("empty_field" if text == "" else "bad_type", "'text'")
    return "", text, True
  for k in ("prompt", "completion"):
    if k not in row:
      raise RowError("missing_field", f"{k!r} (or use a 'text' or 'messages' row)")
    if not isinstance(row[k], str):
      raise RowError("bad_type", f"{k!r} is {type(row[k]).__name__}, not str")
  if not row["completion"]:
    raise RowError("empty_field", "'completion'")
  if template is None:
    return row["prompt"], row["completion"], False
  turns = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": row["prompt"]},
      {"role": "assistant", "content": row["completion"]}]
  return (*_chat_texts(turns, template), False)


def text_doc(row: Any, tokenizer: tok_lib.Tokenizer, template: str | None, system: str | None,
             add_bos: bool, add_eos: bool) -> dict:
  """A text / prompt-completion / chat row's ids, and which are targets: the completion (+
  EOS), or every token of a text row; never the first (its context is another document)."""
  prompt, target, is_text = row_texts(row, template, system)
  head = tokenizer.encode(prompt, add_bos=add_bos)
  eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
  ids = np.asarray(head + tokenizer.encode(target) + eos, np.int32)
  return {"ids": ids, "targets": np.arange(len(ids)) >= (1 if is_text else max(len(head), 1))}


def teacher_doc(row: Any, tokenizer: tok_lib.Tokenizer, k: int, add_eos: bool) -> dict:
  """A distillation row's own token ids and the teacher's top-k per completion token.

  The ids are the ones the teacher sampled (re-tokenising the text could split it
  differently and misalign the per-token targets). Position j of top_ids / top_logprobs is
  the teacher's distribution over token j; an appended EOS has none (teacher_mask False).
  """
  if not isinstance(row, dict):
    raise RowError("bad_type", f"row is {type(row).__name__}, not an object")
  teacher = row.get("teacher")
  if not isinstance(teacher, dict) or "completion_ids" not in row or "prompt_ids" not in row:
    raise RowError("no_teacher", "needs prompt_ids, completion_ids and teacher (generate "
                   "with output.top_k_logprobs)")
  try:
    head = np.asarray(row["prompt_ids"], np.int32).reshape(-1)
    body = np.asarray(row["completion_ids"], np.int32).reshape(-1)
    ids_Txk = np.asarray(teacher["top_ids"], np.int32)
    lp_Txk = np.asarray(teacher["top_logprobs"], np.float32)
  except (KeyError, TypeError, ValueError) as e:
    raise RowError("bad_teacher", f"{type(e).__name__}: {e}") from None
  n = len(body)
  if not n or ids_Txk.shape != lp_Txk.shape or ids_Txk.ndim != 2 or ids_Txk.shape[0] != n:
    raise RowError("bad_teacher", f"top-k {ids_Txk.shape} for {n} completion tokens")
  if ids_Txk.shape[1] < k:
    raise RowError("bad_teacher", f"{ids_Txk.shape[1]} teacher logprobs per token < {k}")
  every = np.concatenate([head, body, ids_Txk[:, :k].reshape(-1)])
  if every.min() < 0 or every.max() >= tokenizer.vocab_size:
    raise RowError("bad_teacher", f"token ids outside the tokenizer's [0, {tokenizer.vocab_size})")
  if not np.all(np.isfinite(lp_Txk[:, :k])) or np.any(lp_Txk[:, :k] > 1e-3):
    raise RowError("bad_teacher", "teacher logprobs must be finite and <= 0")
  eos = tokenizer.eos_id
  tail = [eos] if add_eos and eos is not None and body[-1] != eos else []
  ids = np.concatenate([head, body, np.asarray(tail, np.int32)])
  p = len(head)
  top_ids = np.zeros((len(ids), k), np.int32)
  top_lp = np.zeros((len(ids), k), np.float32)
  has = np.zeros(len(ids), bool)
  top_ids[p:p + n], top_lp[p:p + n], has[p:p + n] = ids_Txk[:, :k], lp_Txk[:, :k], True
  targets = np.zeros(len(ids), bool)
  targets[max(p, 1):] = True
  return {"ids": ids, "targets": targets, "top_ids": top_ids, "top_logprobs": top_lp,
          "teacher_mask": has}
