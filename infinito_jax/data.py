"""The input pipeline: text sources (hub, local files, embedded corpus), tokenization, batches.

Each split becomes non-overlapping windows of seq_len + 1 tokens (inputs [:-1], targets [1:]).
Batches have one fixed shape: the last batch of a split is padded with id 0, which the loss
ignores, so nothing recompiles. Batch `i` of epoch `e` is a pure function of (seed, e, i):
the epoch's order is a permutation drawn from a key derived from (seed, epoch), which is what
makes a resumed run continue bitwise.
"""

import codecs
import contextlib
import dataclasses
import glob
import hashlib
import logging
import math
import os
import stat
import tempfile

import jax
import ml_collections
import numpy as np

from infinito_jax.corpus import CorpusSpec, embedded_corpus
from infinito_jax.errors import DataError
from infinito_jax.model import ModelConfig, check_ids
from infinito_jax.tokenizer import UNK, WordTokenizer

SPLITS = ("train", "validation", "test")
# fold_in tag of the data-order keys. Not a stream of its own under JAX's partitionable
# threefry (the default), where fold_in(k, 1) == split(k)[1]: the data root is the training
# key (train.create_state), and epoch e's permutation key is step e's key, whose split gives
# the dropout and exploration keys. No draw is shared (flax folds each module's path into its
# keys, and the permutation draws from that split itself), but a new consumer drawing
# directly from a step's key would be; changing the tag would change every run's data order
# (and the resume of runs saved before), so it stays.
_DATA_STREAM = 1
_OFFSET_STREAM = 2  # fold_in tag of the window-offset keys (data.random_offsets)
UNK_WARNING = 0.5  # warn when more of a scored split's targets than this are <unk>

__all__ = ["DataError", "Batches", "LMData", "prepare", "make_windows", "file_windows",
           "unk_warning"]


def _alternatives() -> str:
  return ("Use local text files instead (--config.data.source=files "
          "--config.data.files.train=PATH --config.data.files.validation=PATH "
          "[--config.data.files.test=PATH], one text per line, e.g. ../shared/data/wikitext-2), "
          "or the embedded corpus, which needs no network (--config.data.source=embedded).")


@contextlib.contextmanager
def _quiet_datasets(progress: bool):
  """Hugging Face's retry warnings (and, for local files, progress bars) say nothing a user
  can act on; a failure ends in one DataError that names the cause."""
  import datasets  # pylint: disable=g-import-not-at-top
  loggers = [logging.getLogger(n) for n in ("datasets", "huggingface_hub", "fsspec")]
  levels = [l.level for l in loggers]
  bars = datasets.utils.are_progress_bars_disabled()
  for l in loggers:
    l.setLevel(logging.ERROR)
  if not progress:
    datasets.disable_progress_bars()
  try:
    yield
  finally:
    for l, level in zip(loggers, levels):
      l.setLevel(level)
    if not progress and not bars:
      datasets.enable_progress_bars()


def load_hub(name: str, subset: str) -> dict[str, list[str]]:
  """A text dataset from the Hugging Face hub (or its local cache) through `datasets`."""
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    with _quiet_datasets(progress=True):
      ds = datasets.load_dataset(name, subset)
  except Exception as e:  # offline, not cached, unknown name: all end here, with the cause
    raise DataError(f"could not load the dataset {name!r} ({subset}) from the Hugging Face hub "
                    f"or its cache: {type(e).__name__}: {e}. {_alternatives()}") from e
  missing = [s for s in ("train", "validation") if s not in ds]
  if missing:
    raise DataError(f"dataset {name!r} ({subset}) has no {missing} split; it has {list(ds)}.")
  return {s: list(ds[s]["text"]) for s in SPLITS if s in ds}


def _read(f, path: str, what: str) -> bytes:
  try:
    return f.read(1 << 22)
  except OSError as e:  # EIO, a file on a failing disk or a vanished network mount
    raise DataError(f"{what}: reading {path!r} failed ({e.strerror}); check the file and the "
                    "disk it is on.") from None


def check_text_file(path: str, what: str) -> None:
  """Refuses a missing, empty or non-UTF-8 file, naming `what` asked for it and the fix."""
  if os.path.isdir(path):
    raise DataError(f"{what}: {path!r} is a folder; give the path of a text file.")
  try:
    mode = os.stat(path).st_mode
  except OSError:
    if os.path.islink(path):
      raise DataError(f"{what}: {path!r} is a symbolic link to {os.readlink(path)!r}, which does "
                      "not exist; fix the link or give the text file's own path.") from None
    raise DataError(f"{what}: no such file {path!r}; check the path (one text per line).") from None
  if not stat.S_ISREG(mode):  # a pipe or device: read once, it could be neither hashed nor reread
    raise DataError(f"{what}: {path!r} is not a regular file (a pipe, a socket or a device); "
                    "save the text to a file and give its path.")
  decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True

  def refuse(at: int, why: str):
    raise DataError(f"{what}: {path!r} is not UTF-8 text (byte {at} {why}: a binary or "
                    "otherwise encoded file?); convert it to UTF-8 text, one text per line.")

  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise DataError(f"{what}: cannot read {path!r} ({e.strerror}); check its permissions, or "
                    "give a copy you can read.") from None
  with f:
    for chunk in iter(lambda: _read(f, path, what), b""):
      nul = chunk.find(b"\0")  # valid UTF-8, but no text: the first problem is reported
      try:
        decoder.decode(chunk)
      except UnicodeDecodeError as e:
        # e.start counts from the bytes the decoder held back from the previous chunk (< 4)
        start = offset + e.start - (len(e.object) - len(chunk))
        if 0 <= nul and offset + nul < start:
          refuse(offset + nul, "is NUL")
        refuse(start, f"(0x{e.object[e.start]:02x}) cannot be decoded")
      if nul >= 0:
        refuse(offset + nul, "is NUL")
      blank = blank and not chunk.strip()
      offset += len(chunk)
    try:
      decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
      refuse(offset - (len(e.object) - e.start), "begins an unfinished character")
  if blank:
    raise DataError(f"{what}: {path!r} is empty (or only whitespace); give it text, one "
                    "text per line.")


def _scratch_dir(preferred) -> str | None:
  """Where a private datasets cache goes: beside datasets' own (where the user keeps room for
  data) when it can be written, else the system's temporary folder (None)."""
  try:
    os.makedirs(preferred, exist_ok=True)
  except OSError:
    return None
  return str(preferred) if os.access(preferred, os.W_OK | os.X_OK) else None


def load_files(files: dict[str, str], splits=SPLITS) -> dict[str, list[str]]:
  """Local text files (one text per line) through `datasets`' text builder."""
  import datasets  # pylint: disable=g-import-not-at-top
  files = {s: f for s, f in files.items() if f}
  if "train" not in files or "validation" not in files:
    raise DataError("data.source=files needs at least data.files.train and "
                    f"data.files.validation; got {sorted(files)}. {_alternatives()}")
  files = {s: f for s, f in files.items() if s in splits}
  if not files:
    raise DataError(f"this run has no {'/'.join(splits)} split: data.files.{splits[0]} was not "
                    "set when it trained. Score a text file with evaluate.py --data_file PATH.")
  for split, path in files.items():
    check_text_file(path, f"data.files.{split}")
  # The path is a file name, not a pattern ('[1]' or '*' in it are characters), and the text
  # is read now: datasets' cache knows a local file by its path and modification time, so a
  # file replaced by one of the same time (cp -p, rsync -a, an archive) would give the old text
  # beside the new file's sha256. A private cache, gone after the read, never holds old text.
  # "utf-8-sig" drops a byte-order mark, which would otherwise stick to the first word.
  with _quiet_datasets(progress=False), tempfile.TemporaryDirectory(
      prefix="infinito-text-", dir=_scratch_dir(datasets.config.HF_DATASETS_CACHE)) as cache:
    ds = datasets.load_dataset(
        "text", data_files={s: glob.escape(os.path.abspath(p)) for s, p in files.items()},
        cache_dir=cache, encoding="utf-8-sig")
    return {s: list(ds[s]["text"]) for s in files}


def load_texts(data: ml_collections.ConfigDict, seed: int,
               splits=SPLITS) -> tuple[dict[str, list[str]], dict]:
  """Returns ({split: lines} for the `splits` the source has, info); info holds the embedded
  corpus's oracle figures."""
  if data.source == "embedded":
    spec = CorpusSpec(seed=seed if data.corpus.seed is None else data.corpus.seed,
                      **{k: v for k, v in data.corpus.items() if k != "seed"})
    texts, info = embedded_corpus(spec)
  elif data.source == "hub":
    texts, info = load_hub(data.hub_name, data.hub_config), {}
  elif data.source == "files":
    texts, info = load_files(dict(data.files), splits), {}
  else:
    raise DataError(f"data.source must be 'embedded', 'hub' or 'files', got {data.source!r}.")
  return {s: t for s, t in texts.items() if s in splits}, info


def make_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows [N, seq_len + 1] (the tail shorter than a window is dropped)."""
  n = len(ids) // (seq_len + 1)
  return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


class Batches:
  """Fixed-shape batches of one split; batch (epoch, index) is a pure function of its inputs.

  With `ids` (the split's token ids, flat: data.random_offsets), epoch e's windows start at
  offset(e) in [0, seq_len] of the text, drawn from fold_in(fold_in(key(seed), 2), e), and wrap
  around its end: as many windows as `windows` has, other contexts each epoch.
  """

  def __init__(self, windows: np.ndarray, batch_size: int, seed: int, shuffle: bool,
               ids: np.ndarray | None = None):
    self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
    self.ids = ids
    self._order = (None, None)  # (epoch, permutation) of the last epoch asked for
    self._windows = (None, windows)  # (epoch, windows) of the last epoch asked for

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

  def offset(self, epoch: int) -> int:
    """Where epoch `epoch`'s windows start in the text (0 without random offsets)."""
    if self.ids is None:
      return 0
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _OFFSET_STREAM), epoch)
    return int(jax.random.randint(key, (), 0, self.windows.shape[1]))

  def epoch_windows(self, epoch: int) -> np.ndarray:
    """The windows of epoch `epoch`: `windows`, or those starting at offset(epoch)."""
    if self.ids is None:
      return self.windows
    if self._windows[0] != epoch:
      text = np.roll(self.ids, -self.offset(epoch))
      self._windows = (epoch, make_windows(text, self.windows.shape[1] - 1)[:len(self.windows)])
    return self._windows[1]

  def batch(self, epoch: int, index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """{'inputs', 'targets'}: [batch_size, seq_len] int32; short batches padded with 0.

    `rows`: only these rows of the batch (a process of a multi-process run builds its own).
    """
    start, stop, _ = rows.indices(self.batch_size)
    picked = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size][start:stop]
    w = np.zeros((max(0, stop - start), self.windows.shape[1]), np.int32)
    w[:len(picked)] = self.epoch_windows(epoch)[picked]
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}

  def __iter__(self):  # one pass in order (evaluation)
    return (self.batch(0, i) for i in range(len(self)))


class PopulationBatches:
  """The training batches of a population: replica r's batch (epoch, index) is the one a single
  run with seed `seeds[r]` takes, stacked on a leading replica axis: [N, batch_size, seq_len]."""

  def __init__(self, windows: np.ndarray, batch_size: int, seeds, ids: np.ndarray | None = None):
    self.members = [Batches(windows, batch_size, int(s), shuffle=True, ids=ids) for s in seeds]
    self.windows, self.batch_size = windows, batch_size

  def __len__(self):
    return len(self.members[0])

  @property
  def num_tokens(self) -> int:
    return self.members[0].num_tokens

  def batch(self, epoch: int, index: int, replicas: slice = slice(None),
            rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """[N, batch_size, seq_len]; or only `replicas` x `rows` of it (a process's own part)."""
    parts = [m.batch(epoch, index, rows) for m in self.members[replicas]]
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


@dataclasses.dataclass
class LMData:
  """A tokenized corpus: the tokenizer, windows per split, the source's info, and warnings."""
  tokenizer: WordTokenizer
  windows: dict[str, np.ndarray]
  info: dict
  warnings: dict[str, str] = dataclasses.field(default_factory=dict)  # {split: message}
  ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # {split: flat ids}

  def batches(self, split: str, batch_size: int, seed: int = 0, shuffle: bool = False):
    if split not in self.windows:
      raise DataError(f"this data has no {split!r} split; it has {sorted(self.windows)}.")
    return Batches(self.windows[split], batch_size, seed, shuffle)


def fingerprints(data: ml_collections.ConfigDict) -> dict[str, str]:
  """sha256 of the training and validation files (source=files): a resumed run checks that
  the text under the same path is still the same text."""
  if data.source != "files":
    return {}
  return {split: file_sha256(data.files[split]) for split in ("train", "validation")}


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def changed_file_warning(data: ml_collections.ConfigDict, split: str, saved: dict) -> str | None:
  """A warning when the file of a split now holds other text than the run trained and
  validated on (its sha256 is in the checkpoint): its scores are not the run's."""
  if data.source != "files" or split not in saved or not data.files.get(split):
    return None
  now = file_sha256(data.files[split])
  if now == saved[split]:
    return None
  return (f"warning: {describe(data, split)} changed since the run used it (sha256 "
          f"{saved[split][:12]}... -> {now[:12]}...): this scores the text there now, not the "
          "text the run was trained or validated on.")


def file_windows(path: str, tokenizer: WordTokenizer, seq_len: int, what: str) -> np.ndarray:
  """Windows of a local text file tokenized with `tokenizer` (evaluate.py --data_file)."""
  check_text_file(path, what)
  with open(path, encoding="utf-8-sig") as f:  # as load_files: a byte-order mark is no word
    ids = tokenizer.encode(f)
  windows = make_windows(ids, seq_len)
  if len(windows) == 0:
    raise DataError(f"{what}: {path!r} has {_words(len(ids))}, fewer than seq_len + 1 = "
                    f"{seq_len + 1}; give it more text.")
  return windows


def _words(n: int) -> str:
  return f"{n} word" if n == 1 else f"{n} words"


def describe(data: ml_collections.ConfigDict, split: str) -> str:
  """Where a split comes from, for messages: a file name, the hub dataset or the corpus."""
  if data.source == "files":
    return f"data.files.{split} ({data.files.get(split) or 'not set'})"
  if data.source == "hub":
    return f"the {split} split of {data.hub_name} ({data.hub_config})"
  return f"the {split} split of the embedded corpus"


def percent(rate: float) -> str:
  """A rate as a percentage with one decimal that never rounds a part up to the whole."""
  text = f"{rate:.1%}"
  return ">99.9%" if text == "100.0%" and rate < 1 else text


def unk_rate(windows: np.ndarray, tokenizer=None) -> float:
  """The share of target words that read "<unk>": the out-of-vocabulary id and, where the
  training text gave WikiText's literal "<unk>" an id of its own, that id too."""
  ids = tokenizer.unknown_ids() if tokenizer is not None else [UNK]
  return float(np.mean(np.isin(windows[:, 1:], ids)))


def unk_warning(windows: np.ndarray, where: str, tokenizer=None) -> str | None:
  """A warning when most targets are <unk>: a perplexity there measures almost nothing."""
  rate = unk_rate(windows, tokenizer)
  if rate <= UNK_WARNING:
    return None
  return (f"warning: {percent(rate)} of the target words of {where} are outside the vocabulary "
          "(<unk>); its loss and perplexity mostly measure how well <unk> is predicted. The "
          "vocabulary comes from the training split: check that this text is in the same "
          "language and tokenization, or train with a larger model.vocab_size.")


def prepare(config: ml_collections.ConfigDict, model_config: ModelConfig,
            tokenizer: WordTokenizer | None = None, splits=SPLITS) -> LMData:
  """Loads the texts, builds (or reuses) the tokenizer from train only, and makes windows.

  Args:
    config: the full run config (uses `data`, `seed`).
    model_config: checks the ids fit the model (vocab_size, max_len).
    tokenizer: the checkpoint's tokenizer; built from the training split when None.
    splits: the splits to prepare (evaluation asks for one); train is also loaded when the
      tokenizer must be built.
  """
  data = config.data
  if data.seq_len > model_config.max_len:
    raise DataError(f"data.seq_len={data.seq_len} exceeds model.max_len={model_config.max_len}; "
                    f"lower data.seq_len or raise model.max_len.")
  wanted = tuple(splits) + (("train",) if tokenizer is None and "train" not in splits else ())
  texts, info = load_texts(data, config.seed, wanted)
  if tokenizer is None:
    tokenizer = WordTokenizer.build(texts["train"], model_config.vocab_size, data.add_eos)
  if len(tokenizer) > model_config.vocab_size:
    raise DataError(f"the tokenizer has {len(tokenizer)} ids, more than model.vocab_size="
                    f"{model_config.vocab_size}: its ids would reach past the embedding table. "
                    "Give a vocabulary of at most vocab_size ids (fewer is fine), or raise "
                    "model.vocab_size.")
  windows, warnings, split_ids = {}, {}, {}
  for split, lines in texts.items():
    if split not in splits:
      continue
    ids = tokenizer.encode(lines)
    if len(ids) == 0:
      raise DataError(f"{describe(data, split)} contains no words; give it text.")
    w = make_windows(ids, data.seq_len)
    if len(w) == 0:
      more = (f"raise data.corpus.{split}_words (the generated corpus' length)"
              if data.source == "embedded" else "give it more text")
      raise DataError(f"{describe(data, split)} has {_words(len(ids))}, fewer than seq_len + 1 = "
                      f"{data.seq_len + 1}; lower data.seq_len or {more}.")
    check_ids(w.reshape(-1, 1), model_config)  # once here: the jitted steps need no range check
    windows[split], split_ids[split] = w, ids
    if split != "train" and (msg := unk_warning(w, describe(data, split), tokenizer)):
      warnings[split] = msg
  if info and "validation" in windows:  # the oracle compares only where every word has an id
    w = windows["validation"]  # the rate of the targets, as unk_warning's; any <unk> counts
    info = dict(info, validation_unk_rate=unk_rate(w, tokenizer),
                oracle_applies=not np.any(w == UNK))
  return LMData(tokenizer, windows, info, warnings, split_ids)
