"""The embedded corpus: word-like text from a seeded source whose exact entropy rate is known.

The source is a second-order Markov chain over word classes with Zipfian words inside each
class: class c_t depends on (c_{t-2}, c_{t-1}), and each class owns its words, so the word
process is a second-order Markov chain whose entropy rate has a closed form:

  H = sum_{a,b} pi(a, b) H(T[a, b, :])  +  sum_c mu(c) H(E_c)

with pi the stationary distribution of class pairs, mu its class marginal, T the class
transitions and E_c the word distribution of class c. exp(H) is the oracle perplexity: the best
any model can reach. The same formula with only the previous class gives what a model that sees
one word back can reach; the gap is what longer context buys.
"""

import dataclasses
import math

import numpy as np

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh",
           "th", "br", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "l"]


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """Parameters of the embedded source (all sizes in words).

  Attributes:
    seed: seeds the source's structure and, with the split name, its samples.
    num_words: distinct words (the tokenizer needs vocab_size >= num_words + 3 to cover them).
    num_classes: word classes of the second-order chain.
    successors: classes that commonly follow each class pair (the rest share `smoothing`).
    smoothing: probability mass spread evenly over all classes (keeps the chain ergodic).
    zipf: exponent of the within-class word frequencies.
    train_words, validation_words, test_words: the lengths of the three splits.
    words_per_line: line length of the generated text.
  """
  seed: int = 0
  num_words: int = 1000
  num_classes: int = 24
  successors: int = 2
  smoothing: float = 0.02
  zipf: float = 1.1
  train_words: int = 300_000
  validation_words: int = 20_000
  test_words: int = 20_000
  words_per_line: int = 20

  def check(self) -> None:
    """Raises ValueError naming the first parameter that cannot make a corpus."""
    for name in ("num_words", "num_classes", "successors", "words_per_line"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"corpus: {name} must be an integer >= 1, got {getattr(self, name)!r}.")
    for name in ("train_words", "validation_words", "test_words"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"corpus: {name} must be an integer >= 0, got {getattr(self, name)!r}.")
    if self.num_words < self.num_classes:
      raise ValueError(f"corpus: num_words ({self.num_words}) must be >= num_classes "
                       f"({self.num_classes}).")
    if not 1 <= self.successors <= self.num_classes:
      raise ValueError(f"corpus: successors must lie in [1, num_classes], got {self.successors}.")
    if not 0.0 <= self.smoothing <= 1.0 or not self.zipf >= 0.0:
      raise ValueError(f"corpus: smoothing must lie in [0, 1] and zipf be >= 0, got "
                       f"{self.smoothing}, {self.zipf}.")


def _entropy(p, axis=-1):
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


class EmbeddedSource:
  """The seeded second-order source of CorpusSpec: its words, its probabilities, its entropy."""

  def __init__(self, spec: CorpusSpec):
    spec.check()
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 0])
    k = spec.num_classes
    self.words = self._make_words(rng, spec.num_words)
    # class sizes: a few big open classes and many small closed ones, like real parts of speech
    sizes = rng.dirichlet(np.full(k, 0.7)) * (spec.num_words - k)
    sizes = np.floor(sizes).astype(int) + 1
    sizes[np.argmax(sizes)] += spec.num_words - sizes.sum()
    self.word_class = np.repeat(np.arange(k), sizes)[rng.permutation(spec.num_words)]
    self.emission = np.zeros((k, spec.num_words))  # E_c over all words (zero outside c)
    for c in range(k):
      members = np.flatnonzero(self.word_class == c)
      weights = 1.0 / np.arange(1, len(members) + 1) ** spec.zipf
      self.emission[c, rng.permutation(members)] = weights / weights.sum()
    trans = np.full((k, k, k), spec.smoothing / k)
    for a in range(k):
      for b in range(k):
        nxt = rng.choice(k, spec.successors, replace=False)
        trans[a, b, nxt] += (1 - spec.smoothing) * rng.dirichlet(np.ones(spec.successors))
    self.transition = trans / trans.sum(-1, keepdims=True)  # T[a, b, c]
    self.pair_stationary = self._stationary(self.transition)  # pi[a, b]

  @staticmethod
  def _make_words(rng, n):
    words, seen = [], set()
    while len(words) < n:
      syllables = rng.integers(1, 4)
      w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                  for _ in range(syllables)) + _CODAS[rng.integers(len(_CODAS))]
      if w not in seen:
        seen.add(w)
        words.append(w)
    return words

  @staticmethod
  def _stationary(trans):
    """Stationary distribution of the pair chain (a, b) -> (b, c), as a [K, K] array."""
    k = trans.shape[0]
    p = np.zeros((k * k, k * k))
    for a in range(k):
      for b in range(k):
        p[a * k + b, b * k + np.arange(k)] = trans[a, b]
    vals, vecs = np.linalg.eig(p.T)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
    v = np.abs(v) / np.abs(v).sum()
    return v.reshape(k, k)

  @property
  def class_stationary(self):
    return self.pair_stationary.sum(axis=0)  # mu(c) = sum_a pi(a, c)

  def entropy_rate(self) -> float:
    """Exact entropy rate in nats per word: the oracle's cross-entropy."""
    h_class = np.sum(self.pair_stationary * _entropy(self.transition))
    return float(h_class + np.sum(self.class_stationary * _entropy(self.emission)))

  def first_order_entropy(self) -> float:
    """H(w_t | w_{t-1}): the best a model seeing only the previous word can do (nats)."""
    mu = self.class_stationary
    prev = np.einsum("ab,abc->bc", self.pair_stationary, self.transition) / mu[:, None]
    return float(np.sum(mu * _entropy(prev)) + np.sum(mu * _entropy(self.emission)))

  def unigram_entropy(self) -> float:
    """H(w_t): the best a model with no context can do (nats)."""
    return float(_entropy(self.class_stationary @ self.emission))

  def sample(self, n: int, stream: int):
    """n word ids of a stationary run; `stream` picks an independent sample (split)."""
    rng = np.random.default_rng([self.spec.seed, 1, stream])
    k = self.spec.num_classes
    flat = rng.choice(k * k, p=self.pair_stationary.ravel())
    classes = np.empty(n + 2, np.int64)
    classes[0], classes[1] = divmod(flat, k)
    cum = np.cumsum(self.transition, axis=-1)
    u = rng.random(n)
    for t in range(n):
      row = cum[classes[t], classes[t + 1]]
      classes[t + 2] = min(np.searchsorted(row, u[t] * row[-1], side="right"), k - 1)
    classes = classes[2:]
    ids = np.empty(n, np.int64)
    for c in range(k):
      where = np.flatnonzero(classes == c)
      ids[where] = rng.choice(self.spec.num_words, size=len(where), p=self.emission[c])
    return ids, classes

  def log_prob(self, ids):
    """Per-word log P(w_t | w_{t-2}, w_{t-1}) under the source, for t >= 2 (nats)."""
    c = self.word_class[ids]
    return (np.log(self.transition[c[:-2], c[1:-1], c[2:]])
            + np.log(self.emission[c[2:], ids[2:]]))

  def text(self, ids):
    """Lines of `words_per_line` words."""
    per = self.spec.words_per_line
    words = [self.words[i] for i in ids]
    return [" ".join(words[i:i + per]) for i in range(0, len(words), per)]

  def report(self) -> dict:
    h, h1, h0 = self.entropy_rate(), self.first_order_entropy(), self.unigram_entropy()
    return dict(entropy_rate_nats=h, oracle_perplexity=math.exp(h),
                previous_word_only_perplexity=math.exp(h1), unigram_perplexity=math.exp(h0),
                num_words=self.spec.num_words)


SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


def embedded_corpus(spec: CorpusSpec) -> tuple[dict[str, list[str]], dict]:
  """The three splits as lists of text lines, and the source's report (oracle perplexity...)."""
  source = EmbeddedSource(spec)
  sizes = {"train": spec.train_words, "validation": spec.validation_words,
           "test": spec.test_words}
  splits = {name: source.text(source.sample(n, SPLIT_STREAMS[name])[0])
            for name, n in sizes.items()}
  return splits, source.report()
