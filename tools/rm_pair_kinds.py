"""A helpfulness reward model's held-out pairwise accuracy per kind of rejected summary.

  python tools/rm_pair_kinds.py --rm=WORKDIR/rm_helpful/reward_model \\
      --tokenizer=WORKDIR/data/tokenizer.model --pairs=WORKDIR/scenarios/helpful_eval.jsonl

The miniature world's unhelpful answers are of several kinds (data/scenarios.rejected_kind:
a boxed math answer, a refusal, an empty summary, a bare number, a sentence about another
thing, one sentence where a detailed pair chose two). One accuracy over all of them hides which the RM can tell apart: a model that only
learned "a sentence, not a number" scores high overall and is blind to topic. Prints one
JSON line.
"""

import collections
import json

import numpy as np
from absl import app, flags

from r1jax.core.tokenizer import load_tokenizer
from r1jax.data.preferences import load_pairs
from r1jax.data.scenarios import rejected_kind
from r1jax.rewards.reward_model import RewardModel

_RM = flags.DEFINE_string("rm", None, "A reward_model stage's output folder.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The sentencepiece model it was trained with.")
_PAIRS = flags.DEFINE_string("pairs", None, "Preference jsonl: {prompt, chosen, rejected}.")
_TEMPLATE = flags.DEFINE_string("template", "plain", "The chat template it was trained with.")
_MAX_LEN = flags.DEFINE_integer("max_len", 96, "Tokens per prompt + response, as trained.")
flags.mark_flags_as_required(["rm", "tokenizer", "pairs"])


def by_kind(kinds: list[str], chosen: np.ndarray, rejected: np.ndarray) -> dict:
  """{kind: {"pairs", "accuracy"}}: the share of each kind's pairs scored chosen > rejected."""
  wins = collections.defaultdict(list)
  for kind, a, b in zip(kinds, chosen, rejected):
    wins[kind].append(bool(a > b))
  return {k: {"pairs": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(wins.items())}


def main(argv):
  del argv
  rows = load_pairs(_PAIRS.value)
  rm = RewardModel.load(_RM.value, load_tokenizer(_TOKENIZER.value), template=_TEMPLATE.value,
                        max_len=_MAX_LEN.value)
  prompts = [r["prompt"] for r in rows]
  chosen = np.asarray(rm([r["chosen"] for r in rows], prompts))
  rejected = np.asarray(rm([r["rejected"] for r in rows], prompts))
  print(json.dumps({"rm": _RM.value, "pairs": len(rows),
                    "accuracy": float(np.mean(chosen > rejected)),
                    "by_kind": by_kind([rejected_kind(r["rejected"], r["prompt"]) for r in rows], chosen,
                                       rejected)}))


if __name__ == "__main__":
  app.run(main)
