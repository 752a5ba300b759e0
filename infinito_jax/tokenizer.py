"""The original's word-level tokenizer: lower-case, whitespace split, most frequent training words."""

import collections
from collections.abc import Iterable
import json

import numpy as np

PAD, UNK, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<eos>")


class WordTokenizer:
  """Maps words to ids: <pad>=0, <unk>=1, <eos>=2, then training words by frequency.

  Build it from the training split only (`WordTokenizer.build`) and store it with the
  checkpoint (`to_json`), so validation, test and generation use the same ids.
  """

  def __init__(self, words: list[str], add_eos: bool = False):
    if tuple(words[:3]) != SPECIALS:
      raise ValueError(f"a vocabulary must start with {SPECIALS}, got {words[:3]}")
    self.words = list(words)
    self.add_eos = add_eos
    self.index = {w: i for i, w in enumerate(self.words)}  # a repeated word: the later id
    if self.index.get("<pad>") == PAD:  # the word "<pad>" in a text is a word, never padding
      del self.index["<pad>"]  # (which the loss leaves out): unknown unless it has its own id

  @classmethod
  def build(cls, lines: Iterable[str], vocab_size: int, add_eos: bool = False):
    """The vocab_size - 3 most frequent words of `lines` (ties: first seen first)."""
    if vocab_size < 4:
      raise ValueError(f"vocab_size must be at least 4 (3 special ids + 1 word), got {vocab_size}")
    counts = collections.Counter()
    for line in lines:
      counts.update(line.lower().split())
    # As the original: every training word is counted, the literal "<unk>" that WikiText writes
    # in its text included, which then gets an id of its own apart from out-of-vocabulary id 1.
    return cls(list(SPECIALS) + [w for w, _ in counts.most_common(vocab_size - 3)], add_eos)

  def unknown_ids(self) -> list[int]:
    """The ids that read "<unk>": the out-of-vocabulary id 1, and the id of WikiText's own
    literal "<unk>" word where the training text gave it one (as the original does)."""
    return sorted({UNK} | {i for i, w in enumerate(self.words) if w == "<unk>"})

  def __len__(self):
    return len(self.words)

  def encode(self, lines: Iterable[str]) -> np.ndarray:
    """All non-empty lines as one int32 id stream (an <eos> after each line if add_eos)."""
    ids = []
    get = self.index.get
    for line in lines:
      toks = line.lower().split()
      if not toks:
        continue
      ids.extend(get(w, UNK) for w in toks)
      if self.add_eos:
        ids.append(EOS)
    return np.asarray(ids, np.int32)

  def encode_prompt(self, text: str) -> np.ndarray:
    """The ids of a text to continue: as `encode`, without the <eos> that would end it."""
    ids = self.encode([text])
    return ids[:-1] if self.add_eos and len(ids) and ids[-1] == EOS else ids

  def decode(self, ids) -> str:
    """The words of `ids` (<pad> left out); an id outside the vocabulary is a ValueError."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(self.words)]
    if bad:
      raise ValueError(f"ids {bad[:5]} lie outside the vocabulary [0, {len(self.words)}): "
                       "decode ids this tokenizer made, or the model's samples of it.")
    return " ".join(self.words[i] for i in ids if i != PAD)

  def to_json(self) -> str:
    return json.dumps({"words": self.words, "add_eos": self.add_eos})

  @classmethod
  def from_json(cls, text: str):
    d = json.loads(text)
    return cls(d["words"], d.get("add_eos", False))
