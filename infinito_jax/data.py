"""The input pipeline: text sources (hub, local files, embedded corpus), tokenization, batches.

Each split becomes non-overlapping windows of seq_len + 1 tokens (inputs [:-1], targets [1:]).
Batches have one fixed shape: the last batch of a split is padded with id 0, which the loss
ignores, so nothing recompiles. Batch `i` of epoch `e` is a pure function of (seed, e, i):
the epoch's order is a permutation drawn from a key derived from (seed, epoch), which is what
makes a resumed run continue bitwise.
"""

import dataclasses
import math
import os

import jax
import ml_collections
import numpy as np

from infinito_jax.corpus import CorpusSpec, embedded_corpus
from infinito_jax.model import ModelConfig, check_ids
from infinito_jax.tokenizer import UNK, WordTokenizer

SPLITS = ("train", "validation", "test")
_DATA_STREAM = 1  # fold_in tag of the data-order keys, apart from the model's keys


class DataError(RuntimeError):
  """A data source that cannot be loaded; the message names the fix."""


def _alternatives() -> str:
  return ("Use local text files instead (--config.data.source=files "
          "--config.data.files.train=PATH --config.data.files.validation=PATH "
          "[--config.data.files.test=PATH], one text per line, e.g. ../shared/data/wikitext-2), "
          "or the embedded corpus, which needs no network (--config.data.source=embedded).")


def load_hub(name: str, subset: str) -> dict[str, list[str]]:
  """A text dataset from the Hugging Face hub (or its local cache) through `datasets`."""
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    ds = datasets.load_dataset(name, subset)
  except Exception as e:  # offline, not cached, unknown name: all end here, with the cause
    raise DataError(f"could not load the dataset {name!r} ({subset}) from the Hugging Face hub "
                    f"or its cache: {type(e).__name__}: {e}. {_alternatives()}") from e
  missing = [s for s in ("train", "validation") if s not in ds]
  if missing:
    raise DataError(f"dataset {name!r} ({subset}) has no {missing} split; it has {list(ds)}.")
  return {s: list(ds[s]["text"]) for s in SPLITS if s in ds}


def load_files(files: dict[str, str]) -> dict[str, list[str]]:
  """Local text files (one text per line) through `datasets`' text builder."""
  import datasets  # pylint: disable=g-import-not-at-top
  files = {s: f for s, f in files.items() if f}
  if "train" not in files or "validation" not in files:
    raise DataError("data.source=files needs at least data.files.train and "
                    f"data.files.validation; got {sorted(files)}. {_alternatives()}")
  for split, path in files.items():
    if not os.path.isfile(path):
      raise DataError(f"data.files.{split}: no such file {path!r} (relative paths are taken "
                      f"from {os.getcwd()}). {_alternatives()}")
  ds = datasets.load_dataset("text", data_files={s: os.path.abspath(p) for s, p in files.items()})
  return {s: list(ds[s]["text"]) for s in files}


def load_texts(data: ml_collections.ConfigDict, seed: int) -> tuple[dict[str, list[str]], dict]:
  """Returns ({split: lines}, info); info holds the embedded corpus's oracle figures."""
  if data.source == "embedded":
    spec = CorpusSpec(seed=seed if data.corpus.seed is None else data.corpus.seed,
                      **{k: v for k, v in data.corpus.items() if k != "seed"})
    return embedded_corpus(spec)
  if data.source == "hub":
    return load_hub(data.hub_name, data.hub_config), {}
  if data.source == "files":
    return load_files(dict(data.files)), {}
  raise DataError(f"data.source must be 'embedded', 'hub' or 'files', got {data.source!r}.")


def make_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows [N, seq_len + 1] (the tail shorter than a window is dropped)."""
  n = len(ids) // (seq_len + 1)
  return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


class Batches:
  """Fixed-shape batches of one split; batch (epoch, index) is a pure function of its inputs."""

  def __init__(self, windows: np.ndarray, batch_size: int, seed: int, shuffle: bool):
    self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
    self._order = (None, None)  # (epoch, permutation) of the last epoch asked for

  def __len__(self):
    return math.ceil(len(self.windows) / self.batch_size)

  @property
  def num_tokens(self) -> int:
    return int(np.sum(self.windows[:, 1:] != 0))

  def order(self, epoch: int) -> np.ndarray:
    """The epoch's window order: a permutation from fold_in(fold_in(key(seed), 1), epoch)."""
    if not self.shuffle:
      return np.arange(len(self.windows))
    if self._order[0] != epoch:
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _DATA_STREAM), epoch)
      self._order = (epoch, np.asarray(jax.random.permutation(key, len(self.windows))))
    return self._order[1]

  def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
    """{'inputs', 'targets'}: [batch_size, seq_len] int32; short batches padded with 0."""
    rows = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
    w = np.zeros((self.batch_size, self.windows.shape[1]), np.int32)
    w[:len(rows)] = self.windows[rows]
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}

  def __iter__(self):  # one pass in order (evaluation)
    return (self.batch(0, i) for i in range(len(self)))


@dataclasses.dataclass
class LMData:
  """A tokenized corpus: the tokenizer, windows per split, and the source's info."""
  tokenizer: WordTokenizer
  windows: dict[str, np.ndarray]
  info: dict

  def batches(self, split: str, batch_size: int, seed: int = 0, shuffle: bool = False):
    if split not in self.windows:
      raise DataError(f"this data has no {split!r} split; it has {sorted(self.windows)}.")
    return Batches(self.windows[split], batch_size, seed, shuffle)


def prepare(config: ml_collections.ConfigDict, model_config: ModelConfig,
            tokenizer: WordTokenizer | None = None) -> LMData:
  """Loads the texts, builds (or reuses) the tokenizer from train only, and makes windows.

  Args:
    config: the full run config (uses `data`, `seed`).
    model_config: checks the ids fit the model (vocab_size, max_len).
    tokenizer: the checkpoint's tokenizer; built from the training split when None.
  """
  data = config.data
  if data.seq_len > model_config.max_len:
    raise DataError(f"data.seq_len={data.seq_len} exceeds model.max_len={model_config.max_len}; "
                    f"lower data.seq_len or raise model.max_len.")
  texts, info = load_texts(data, config.seed)
  if tokenizer is None:
    tokenizer = WordTokenizer.build(texts["train"], model_config.vocab_size, data.add_eos)
  if len(tokenizer) > model_config.vocab_size:
    raise DataError(f"the tokenizer has {len(tokenizer)} ids but model.vocab_size is "
                    f"{model_config.vocab_size}; they must agree.")
  windows = {}
  for split, lines in texts.items():
    w = make_windows(tokenizer.encode(lines), data.seq_len)
    if len(w) == 0:
      raise DataError(f"the {split} split has fewer than seq_len + 1 = {data.seq_len + 1} "
                      f"tokens; lower data.seq_len or give it more text.")
    check_ids(w.reshape(-1, 1), model_config)  # once here: the jitted steps need no range check
    windows[split] = w
  if info:  # the oracle's perplexity compares only where every word has its own id
    unk = float(np.mean(windows["validation"] == UNK))
    info = dict(info, validation_unk_rate=unk, oracle_applies=unk == 0.0)
  return LMData(tokenizer, windows, info)
