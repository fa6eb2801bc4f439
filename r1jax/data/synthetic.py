"""The miniature R1-Zero's world: multi-step arithmetic problems and a "web" corpus about them.

Nothing is downloaded. A problem is a chain of 2–3 additions / subtractions of numbers 1–9
whose running value stays in [0, 40], e.g. "Compute 7 + 5 - 9" (gold 3). Problems are split
by a hash of their expression, so the held-out split never appears in the pretraining corpus
nor in the RL prompts: held-out pass@1 measures generalisation, not recall.

The pretraining corpus mimics what a base model sees on the web: the same kind of problems
worked in several house styles (Q/A pages, forum dialogues, GSM8K-style `#### N` solutions,
LaTeX `\\boxed{}` answers, terse one-liners, and a minority of pages that use
`<think>…</think> <answer>…</answer>` tags), plus plain English filler. It never contains the
R1-Zero instruction template. The base therefore has weak but real arithmetic ability and has
seen the tags, yet does not follow the template: that is what RL has to teach it (R1-Zero §2.2).

A `World` widens it for the whole R1 recipe: chains of `min_ops`–`max_ops` operations in equal
shares per level (so length and accuracy can be read per difficulty), a share of solutions
worked in Chinese (the base, and R1-Zero from it, then mix languages in their reasoning), and
a share that writes one step wrong and corrects it ("Wait, 7 + 5 is 12, not 13"): the shallow
self-checking base models already show. It also sets the share of tag-style solutions and of
pages whose working starts on its own line (`<think>\n7 + 5 = 12`…, as in R1's readable
format): a context the base has never seen before a copied operand is one it copies badly.
And it sets the share of prose blocks that stay on one thing, as a web page does: a base that
has seen a thing named again and again can echo the thing a prompt asks about.
Without a World (None) the world is exactly the original one, draw for draw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Iterator, NamedTuple

from r1jax.core import tokenizer as tok_lib
from r1jax.core.storage import Path

MIN_OPERAND, MAX_OPERAND = 1, 9
MAX_VALUE = 40
HELD_OUT_BUCKETS = 10  # 1 in 10 expressions is held out


@dataclasses.dataclass(frozen=True)
class World:
  """What the generated world holds beyond R1-Zero's (module doc)."""

  min_ops: int = 2  # easiest level: operations per chain
  max_ops: int = 3  # hardest level
  second_language: float = 0.0  # share of corpus solutions worked in Chinese
  self_check: float = 0.0  # share of corpus solutions with one wrong step, then corrected
  tags: float = 0.08  # share of corpus solutions in `<think> … </think> <answer> … </answer>`
  newline: float = 0.0  # share of pages whose working starts on its own line (tags too)
  topical: float = 0.0  # share of prose blocks about one thing, named in every sentence

  def __post_init__(self):
    if not 2 <= self.min_ops <= self.max_ops <= 8:  # one operation: ~120 problems in all
      raise ValueError(f"need 2 <= min_ops <= max_ops <= 8, got {self.min_ops}, {self.max_ops}")
    for name in ("second_language", "self_check", "tags", "newline", "topical"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"World.{name} must be a share in [0, 1], got {getattr(self, name)}")

  @property
  def levels(self) -> tuple[int, ...]:
    return tuple(range(self.min_ops, self.max_ops + 1))

  @property
  def style_weights(self) -> tuple[float, ...]:
    """`_STYLES`' weights: `tags` for the tag style, the others in their original ratio."""
    rest = sum(w for s, w in zip(_STYLES, _STYLE_WEIGHTS) if s != "tags")
    return tuple(self.tags if s == "tags" else w / rest * (1.0 - self.tags)
                 for s, w in zip(_STYLES, _STYLE_WEIGHTS))


@dataclasses.dataclass(frozen=True)
class Problem:
  """An arithmetic chain: numbers[0] op[0] numbers[1] op[1] …"""

  numbers: tuple[int, ...]
  ops: tuple[str, ...]  # "+" or "-", len(numbers) - 1

  @property
  def expression(self) -> str:
    parts = [str(self.numbers[0])]
    for op, n in zip(self.ops, self.numbers[1:]):
      parts += [op, str(n)]
    return " ".join(parts)

  def steps(self) -> list[tuple[int, str, int, int]]:
    """(left, op, right, result) for each operation, left to right."""
    out, value = [], self.numbers[0]
    for op, n in zip(self.ops, self.numbers[1:]):
      new = value + n if op == "+" else value - n
      out.append((value, op, n, new))
      value = new
    return out

  @property
  def answer(self) -> int:
    return self.steps()[-1][3]

  @property
  def held_out(self) -> bool:
    digest = hashlib.sha1(self.expression.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def random_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 3) -> Problem:
  """A uniformly drawn chain whose every running value stays in [0, MAX_VALUE]."""
  while True:
    k = rng.randint(min_ops, max_ops)
    numbers = [rng.randint(MIN_OPERAND, MAX_OPERAND) for _ in range(k + 1)]
    ops = [rng.choice("+-") for _ in range(k)]
    p = Problem(tuple(numbers), tuple(ops))
    if all(0 <= s[3] <= MAX_VALUE for s in p.steps()):
      return p


def chain(rng: random.Random, ops: int) -> Problem:
  """A chain of exactly `ops` operations whose every running value stays in [0, MAX_VALUE]."""
  while True:
    p = Problem(tuple(rng.randint(MIN_OPERAND, MAX_OPERAND) for _ in range(ops + 1)),
                tuple(rng.choice("+-") for _ in range(ops)))
    if all(0 <= s[3] <= MAX_VALUE for s in p.steps()):
      return p


def problems(split: str, count: int, seed: int, world: World | None = None) -> list[Problem]:
  """`count` distinct problems of one split ("train" or "held_out"), deterministic in seed.
  With a `world`, its levels take turns, so each holds an equal share (±1)."""
  if split not in ("train", "held_out"):
    raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
  rng, seen, out, misses = random.Random(f"{split}-{seed}"), set(), [], 0
  while len(out) < count:
    p = (random_problem(rng) if world is None
         else chain(rng, world.levels[len(out) % len(world.levels)]))
    if p.held_out == (split == "held_out") and p.expression not in seen:
      seen.add(p.expression)
      out.append(p)
      misses = 0
    elif (misses := misses + 1) > 200_000:
      raise ValueError(f"the {split} split has too few distinct problems for {count} "
                       f"(found {len(out)}); ask for fewer or widen the levels")
  return out


def question(p: Problem, rng: random.Random | None = None) -> str:
  """The problem as asked (no final punctuation: templates add their own)."""
  forms = ("Compute {e}", "What is {e}", "Calculate {e}", "Evaluate {e}")
  form = forms[0] if rng is None else rng.choice(forms)
  return form.format(e=p.expression)


# ------------------------------------------------------------------------- the web corpus


class _Phrases(NamedTuple):
  """A language's connectives for worked steps."""

  first: str
  then: str
  step: str  # "Step {i}: "
  stop: str  # the end of a sentence
  answer: str  # "The answer is {a}."
  fix: str  # a correction: "Wait, {x} is {c}, not {w}."


_PHRASES = {
    "en": _Phrases("First, ", "Then ", "Step {i}: ", ".", "The answer is {a}.",
                   "Wait, {x} is {c}, not {w}."),
    "zh": _Phrases("首先，", "然后 ", "第{i}步：", "。", "答案是 {a}。", "等等，{x} 是 {c}，不是 {w}。"),
}


def _slip(c: int, rng: random.Random) -> int:
  """A wrong result near c (off by 1 or 2, never negative)."""
  return rng.choice([w for w in (c - 2, c - 1, c + 1, c + 2) if w >= 0])


def _working(p: Problem, rng: random.Random, lang: str = "en", check: bool = False) -> str:
  """Step-by-step arithmetic, in one of a few phrasings. `check`: one step is first written
  with a wrong result, then corrected in the next sentence (the rest goes on from the right
  value)."""
  first, then, step_i, stop, _, fix = _PHRASES[lang]
  steps = [f"{a} {op} {b} = {c}" for a, op, b, c in p.steps()]
  if check:
    j = rng.randrange(len(steps))
    a, op, b, c = p.steps()[j]
    x, w = f"{a} {op} {b}", _slip(c, rng)
    steps[j] = f"{x} = {w}{stop} " + fix.format(x=x, c=c, w=w)[:-len(stop)]
  style = rng.randrange(3) if lang == "en" else rng.randrange(1, 3)  # zh: in words
  if style == 0:
    return f"{stop} ".join(steps) + stop
  if style == 1:
    return first + steps[0] + stop + " " + " ".join(f"{then}{s}{stop}" for s in steps[1:])
  return " ".join(f"{step_i.format(i=i + 1)}{s}{stop}" for i, s in enumerate(steps))


_STYLES = ("plain", "gsm8k", "boxed", "tags", "terse")
_STYLE_WEIGHTS = (32, 20, 20, 8, 20)


def _solution(p: Problem, rng: random.Random, lang: str = "en", check: bool = False,
              weights: tuple[float, ...] = _STYLE_WEIGHTS, newline: bool = False) -> str:
  """One solution page body in a random house style (`weights` over `_STYLES`). `newline`:
  the tag style puts its tags on their own lines, as R1's readable format does."""
  a, work = p.answer, _working(p, rng, lang, check)
  style = rng.choices(_STYLES, weights)[0]
  if style == "terse" and (check or lang != "en"):
    style = "plain"  # a one-liner has no steps to correct, nor words of a language
  if style == "plain":
    return f"{work} {_PHRASES[lang].answer.format(a=a)}"
  if style == "gsm8k":
    return f"{work}\n#### {a}"
  if style == "boxed":
    return f"{work} So the result is $\\boxed{{{a}}}$."
  if style == "tags":
    sep = "\n" if newline else " "
    return f"<think>{sep}{work}{sep}</think> <answer> {a} </answer>"
  return f"{p.expression} = {a}."


def _page(p: Problem, rng: random.Random, lang: str = "en", check: bool = False,
          world: World | None = None) -> str:
  """A problem with its solution, wrapped like a Q&A page, a worksheet or a forum dialogue.
  With a `world`, its share of pages starts the working on a new line, and its share of tag
  solutions; without one, the original draws."""
  q = question(p, rng)
  if world is None:
    sol, sep = _solution(p, rng, lang, check), " "
  else:
    nl = rng.random() < world.newline
    sol, sep = _solution(p, rng, lang, check, world.style_weights, nl), "\n" if nl else " "
  wrap = rng.randrange(5)
  if wrap == 0:
    return f"Question: {q}?\nAnswer:{sep}{sol}"
  if wrap == 1:
    return f"Q: {q}. A:{sep}{sol}"
  if wrap == 2:
    return f"User: {q}. Assistant:{sep}{sol}"
  if wrap == 3:
    return f"Problem: {q}.\nSolution:{sep}{sol}"
  return f"{q}.{sep}{sol}"


ROLES = ("the teacher", "a student", "my friend", "the class", "our team", "the author",
          "the user", "the assistant", "the reader", "a helper", "the tutor", "everyone")
VERBS = ("wrote", "checked", "solved", "explained", "read", "shared", "asks about",
          "thinks about", "provides", "encloses", "reviews", "answers", "repeats", "describes")
THINGS = ("the worksheet", "a long problem", "the notes", "an easy question", "the answers",
           "a short story", "the conversation", "the reasoning process", "the question",
           "the tags", "the answer", "each step", "the lesson", "the mind map", "the process")
TAILS = ("today", "again", "in the morning", "after lunch", "with care", "for the test",
          "first", "respectively", "in the mind", "here", "and then moves on", "quickly",
          "before the answer", "within the page", "i.e. step by step")


# Prose that mentions reasoning tags, as documentation and forum pages do; what follows such a
# sentence is a solution in any house style, so a tag mention never implies a tag answer.
_TAG_TALK = ("Some pages put the working in <think> </think> and the result in <answer> </answer>.",
             "Here the tags <think> </think> and <answer> </answer> mark the steps and the result.",
             "A tutor may enclose the steps within <think> </think> tags, or not at all.",
             "The format with <answer> </answer> tags is one option; plain text is another.",
             "Write the reasoning first, i.e. each step, and the answer after it.",
             "Tags such as <think> and </think> are optional on this page.")


def _filler(rng: random.Random, topical: float = 0.0) -> str:
  """Simple English (1-8 sentences), so the base learns to read past prose to a question.

  It shares common words with instruction prompts (user, assistant, reasoning, answer, …)
  as web text does, but never the R1-Zero instruction itself. A `topical` share of blocks
  names one thing in every sentence (no extra draw at 0: the original corpus, draw for draw).
  """
  out, thing = [], None
  if topical and rng.random() < topical:
    thing = rng.choice(THINGS)
  for _ in range(rng.randint(1, 8)):
    s = (f"{rng.choice(ROLES)} {rng.choice(VERBS)} {thing or rng.choice(THINGS)} "
         f"{rng.choice(TAILS)}")
    out.append(s[0].upper() + s[1:] + rng.choice((".", ".", ",", ";")))
  if rng.random() < 0.4:
    out.insert(rng.randint(0, len(out)), rng.choice(_TAG_TALK))
  return " ".join(out)


def corpus(num_docs: int, seed: int, world: World | None = None) -> Iterator[str]:
  """Pretraining documents: worked problems of the train split, half led by prose. With a
  `world`: its levels in equal shares, and its shares of Chinese and self-checked solutions
  (the question stays English, as the prompts are)."""
  rng = random.Random(f"corpus-{seed}")
  for i in range(num_docs):
    draw = (random_problem if world is None
            else lambda r: chain(r, world.levels[i % len(world.levels)]))
    p = draw(rng)
    while p.held_out:
      p = draw(rng)
    lang, check = "en", False
    if world is not None:
      lang = "zh" if rng.random() < world.second_language else "en"
      check = rng.random() < world.self_check
    doc = _page(p, rng, lang, check, world)
    if rng.random() < 0.5:
      doc = f"{_filler(rng, world.topical if world else 0.0)}{rng.choice((' ', chr(10)))}{doc}"
    yield doc


def write_jsonl(path: str | Path, rows) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return path


def problem_rows(ps: list[Problem], prefix: str) -> list[dict]:
  """Rows in the generic problem schema: {"id", "question", "answer", "task", "level"}."""
  return [{"id": f"{prefix}-{i}", "question": question(p), "answer": str(p.answer),
           "task": "math", "level": len(p.ops)} for i, p in enumerate(ps)]


def write_dataset(out_dir: str | Path, *, corpus_docs: int, train_problems: int,
                  held_out_problems: int, seed: int = 0,
                  world: World | None = None) -> dict[str, Path]:
  """Writes corpus.jsonl ({"text"}), rl_train.jsonl and held_out.jsonl; returns their paths."""
  out = Path(out_dir)
  docs = ({"text": d} for d in corpus(corpus_docs, seed, world))
  paths = {
      "corpus": write_jsonl(out / "corpus.jsonl", docs),
      "rl_train": write_jsonl(out / "rl_train.jsonl", problem_rows(
          problems("train", train_problems, seed, world), "train")),
      "held_out": write_jsonl(out / "held_out.jsonl", problem_rows(
          problems("held_out", held_out_problems, seed, world), "test")),
  }
  return paths


def tokenizer_texts(corpus_path: str | Path, limit: int = 20000) -> Iterator[str]:
  """Text for training the tokenizer: corpus documents plus the prompt templates' words.

  The tokenizer (not the model) sees the R1-Zero instruction, so its words become pieces and
  the prompt costs ~60 tokens instead of ~300 bytes; the model is never trained on it.
  """
  with Path(corpus_path).open("r", encoding="utf-8") as f:
    for i, line in enumerate(f):
      if i >= limit:
        break
      yield json.loads(line)["text"]
  for _ in range(limit // 4):
    yield tok_lib.R1_ZERO_PROMPT
