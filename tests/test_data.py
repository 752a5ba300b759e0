"""The input pipeline: sources load, windows and batches are fixed and reproducible, errors help."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import tiny
from conftest import SHARED
from infinito_jax import data as data_lib
from infinito_jax.model import model_config
from infinito_jax.tokenizer import WordTokenizer

WIKITEXT = SHARED / "data" / "wikitext-2"


def test_embedded_corpus_loads_with_train_only_vocabulary():
  config = tiny.get_config()
  data = data_lib.prepare(config, model_config(config.model))
  assert set(data.windows) == {"train", "validation", "test"}
  for w in data.windows.values():
    assert w.shape[1] == config.data.seq_len + 1 and w.dtype == np.int32
    assert w.max() < config.model.vocab_size and w.min() >= 1
  train_words = {w for line in data_lib.load_texts(config.data, config.seed)[0]["train"]
                 for w in line.split()}
  assert set(data.tokenizer.words[3:]) <= train_words
  assert data.info["oracle_perplexity"] > 1


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is absent here")
def test_local_wikitext_files_load_through_datasets():
  config = tiny.get_config()
  config.data.source = "files"
  config.data.files.train = str(WIKITEXT / "test.txt")
  config.data.files.validation = str(WIKITEXT / "valid.txt")
  config.model.vocab_size = 2000
  config.data.seq_len = 32
  data = data_lib.prepare(config, model_config(config.model))
  tok = data.tokenizer
  assert len(tok) == 2000 and tok.words[3] == "the"
  train_tokens = data.windows["train"].size
  assert 200_000 < train_tokens < 260_000  # test.txt holds about 245k words
  assert "validation" in data.windows and "test" not in data.windows
  assert 0.05 < np.mean(data.windows["validation"] == 1) < 0.4  # <unk>: train-only vocabulary


def test_windows_are_non_overlapping_and_drop_the_short_tail():
  ids = np.arange(23, dtype=np.int32)
  w = data_lib.make_windows(ids, seq_len=4)
  np.testing.assert_array_equal(w, np.arange(20).reshape(4, 5))


def test_batches_have_one_shape_and_pad_the_last_with_zeros():
  windows = np.arange(1, 1 + 7 * 5, dtype=np.int32).reshape(7, 5)
  batches = data_lib.Batches(windows, batch_size=3, seed=0, shuffle=True)
  assert len(batches) == 3
  seen = []
  for i in range(3):
    b = batches.batch(epoch=0, index=i)
    assert b["inputs"].shape == b["targets"].shape == (3, 4)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    seen += [r for r in b["targets"].tolist() if any(r)]
  last = batches.batch(0, 2)
  assert np.all(last["targets"][1:] == 0) and np.all(last["inputs"][1:] == 0)
  assert sorted(map(tuple, seen)) == sorted(map(tuple, windows[:, 1:].tolist()))


def test_epoch_order_is_a_function_of_seed_and_epoch():
  windows = np.arange(1, 1 + 50 * 3, dtype=np.int32).reshape(50, 3)
  a = data_lib.Batches(windows, 4, seed=1, shuffle=True)
  b = data_lib.Batches(windows, 4, seed=1, shuffle=True)
  np.testing.assert_array_equal(a.order(0), b.order(0))
  assert not np.array_equal(a.order(0), a.order(1))
  assert not np.array_equal(a.order(0), data_lib.Batches(windows, 4, 2, True).order(0))
  assert sorted(a.order(3)) == list(range(50))


def test_random_offsets_give_other_windows_of_the_same_text_each_epoch():
  """data.random_offsets: epoch e's windows are the text rolled by offset(e) in [0, seq_len],
  cut into as many windows as without offsets (so the steps per epoch do not change); the
  offsets are a pure function of (seed, epoch) and differ between seeds and epochs, and the
  batches shuffle those windows with the same order as without offsets."""
  ids = np.arange(1, 1 + 203, dtype=np.int32)
  seq_len = 9
  windows = data_lib.make_windows(ids, seq_len)
  a = data_lib.Batches(windows, 4, seed=3, shuffle=True, ids=ids)
  plain = data_lib.Batches(windows, 4, seed=3, shuffle=True)
  offsets = [a.offset(e) for e in range(12)]
  assert all(0 <= o <= seq_len for o in offsets) and len(set(offsets)) > 3, offsets
  assert offsets == [data_lib.Batches(windows, 4, 3, True, ids=ids).offset(e) for e in range(12)]
  assert offsets != [data_lib.Batches(windows, 4, 4, True, ids=ids).offset(e) for e in range(12)]
  assert plain.offset(5) == 0 and plain.epoch_windows(5) is windows
  for e, o in enumerate(offsets[:4]):
    w = a.epoch_windows(e)
    assert w.shape == windows.shape
    np.testing.assert_array_equal(w.reshape(-1), np.roll(ids, -o)[:w.size])
    np.testing.assert_array_equal(a.order(e), plain.order(e))
    b = a.batch(e, 1)
    np.testing.assert_array_equal(b["inputs"], w[a.order(e)[4:8], :-1])
    np.testing.assert_array_equal(b["targets"], w[a.order(e)[4:8], 1:])


def test_prepare_keeps_each_splits_flat_ids_for_random_offsets():
  """LMData.ids holds each split's id stream, whose first windows are LMData.windows."""
  config = tiny.get_config()
  data = data_lib.prepare(config, model_config(config.model))
  for split, w in data.windows.items():
    np.testing.assert_array_equal(data.ids[split][:w.size], w.reshape(-1))


def test_missing_local_file_is_named(tmp_path):
  config = tiny.get_config()
  config.data.source = "files"
  config.data.files.train = str(tmp_path / "nope.txt")
  config.data.files.validation = str(tmp_path / "nope.txt")
  with pytest.raises(data_lib.DataError, match=r"data.files.train: no such file .*nope.txt"):
    data_lib.prepare(config, model_config(config.model))


def test_an_unreadable_or_dangling_data_file_is_one_clear_error(tmp_path):
  """A data file that exists but cannot be read (no permission) crashed with a traceback; a
  symbolic link to nothing was called a missing file. Both are DataErrors naming the fix."""
  target = tmp_path / "secret.txt"
  target.write_text("some words\n")
  target.chmod(0)
  unreadable = str(target)
  if os.access(unreadable, os.R_OK):  # root reads anything: a file not even root may read
    unreadable = "/proc/sys/vm/compact_memory"
    try:
      open(unreadable, "rb").close()
      pytest.skip("no file here that this user cannot read")
    except PermissionError:
      pass
    except OSError:
      pytest.skip("no file here that this user cannot read")
  with pytest.raises(data_lib.DataError, match=r"data.files.validation: cannot read .*Permission "
                                               r"denied.*permissions"):
    data_lib.check_text_file(unreadable, "data.files.validation")
  link = tmp_path / "dangling.txt"
  link.symlink_to(tmp_path / "gone.txt")
  with pytest.raises(data_lib.DataError, match=r"symbolic link to .*gone.txt.*which does not "
                                               r"exist"):
    data_lib.check_text_file(str(link), "data.files.train")


def test_the_unk_rate_counts_the_literal_unk_word_too():
  """WikiText writes <unk> in its text, which gets an id of its own (as in the original):
  the <unk> rate and its warning count both ids that read <unk>."""
  from infinito_jax.tokenizer import WordTokenizer  # pylint: disable=import-outside-toplevel
  tok = WordTokenizer.build(["<unk> <unk> a b"], vocab_size=10)
  windows = np.asarray([[5, 1, 3, 1, 3]], np.int32)  # targets: <unk>(1), literal, <unk>, literal
  assert data_lib.unk_rate(windows, tok) == 1.0
  assert data_lib.unk_rate(windows) == 0.5  # without a tokenizer: id 1 only
  assert data_lib.unk_warning(windows, "here", tok) is not None


@pytest.mark.parametrize("content", [
    b"\xd3 random bytes first, a NUL later \x00",  # Python's decoder fails at byte 0
    b"text, then a NUL \x00 before a bad byte \xff",
    b"text, a bad byte \xff before a NUL \x00",
    "caf\u00e9 then a cut character ".encode() + "\u20ac".encode()[:2],
    b"a" * ((1 << 22) - 1) + "\u00e9".encode() + b" across the read boundary \xfe",
], ids=["bad-first", "nul-first", "bad-byte-first", "unfinished", "chunk-boundary"])
def test_a_file_that_is_not_utf8_names_its_first_bad_byte(tmp_path, content):
  """The offset in the error is where the file stops being UTF-8 text: Python's own decoder's
  first error, or an earlier NUL byte (decodable, but no text)."""
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  try:
    content.decode("utf-8")
    first = len(content)
  except UnicodeDecodeError as e:
    first = e.start
  nul = content.find(b"\0")
  expected = min(first, nul) if nul >= 0 else first
  with pytest.raises(data_lib.DataError, match=rf"not UTF-8 text \(byte {expected} "):
    data_lib.check_text_file(str(path), "data.files.train")


def test_seq_len_beyond_the_position_table_is_refused():
  config = tiny.get_config()
  config.data.seq_len = config.model.max_len + 1
  with pytest.raises(data_lib.DataError, match="exceeds model.max_len"):
    data_lib.prepare(config, model_config(config.model))


def test_unreachable_hub_gives_a_clear_error_and_no_fallback(tmp_path):
  """With the hub unreachable and nothing cached: an error naming both offline options."""
  script = textwrap.dedent("""
      from configs import tiny
      from infinito_jax import data
      from infinito_jax.model import model_config
      c = tiny.get_config(); c.data.source = 'hub'
      try:
          data.prepare(c, model_config(c.model))
      except data.DataError as e:
          print('DATAERROR', e)
  """)
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1",
             HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert "DATAERROR" in out.stdout, out.stderr[-2000:]
  assert "Salesforce/wikitext" in out.stdout
  assert "--config.data.source=files" in out.stdout and "--config.data.source=embedded" in out.stdout


def test_a_validation_split_mostly_outside_the_vocabulary_is_warned_about(tmp_path):
  """A perplexity on text that is all <unk> measures nothing: say so, naming the file."""
  (tmp_path / "train.txt").write_text(" ".join(f"w{i % 40}" for i in range(2000)) + "\n")
  (tmp_path / "valid.txt").write_text(" ".join(f"zz{i}" for i in range(400)) + "\n")
  config = tiny.get_config()
  config.data.source = "files"
  config.data.files.train = str(tmp_path / "train.txt")
  config.data.files.validation = str(tmp_path / "valid.txt")
  data = data_lib.prepare(config, model_config(config.model))
  assert "100.0% of the target words of data.files.validation" in data.warnings["validation"]
  assert "valid.txt" in data.warnings["validation"] and "train" not in data.warnings
  config.data.files.validation = str(tmp_path / "train.txt")  # the same words: no warning
  assert data_lib.prepare(config, model_config(config.model)).warnings == {}


def _two_files(tmp_path, train_name="train.txt"):
  train, valid = tmp_path / train_name, tmp_path / "valid.txt"
  train.write_text("alpha beta gamma\ndelta epsilon\n")
  valid.write_text("alpha beta\n")
  return train, valid


def test_a_file_replaced_under_the_same_time_is_read_anew(tmp_path):
  """datasets' cache knows a local file by path and modification time: a file replaced by one
  of the same time (cp -p, rsync -a, an archive) must still give its new text, the text whose
  sha256 the run records."""
  train, valid = _two_files(tmp_path)
  files = {"train": str(train), "validation": str(valid)}
  assert data_lib.load_files(files)["train"] == ["alpha beta gamma", "delta epsilon"]
  stamp = os.stat(train)
  train.write_text("zeta eta theta\n")
  os.utime(train, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
  assert os.stat(train).st_mtime_ns == stamp.st_mtime_ns
  assert data_lib.load_files(files)["train"] == ["zeta eta theta"]


def test_a_file_name_is_not_a_pattern(tmp_path):
  """'[1]' or '*' in a path are characters of its name: datasets would read them as a glob
  (here: the other file 'tr1.txt') while the sha256 is of the named one."""
  train, valid = _two_files(tmp_path, "tr[1].txt")
  (tmp_path / "tr1.txt").write_text("other words entirely\n")
  texts = data_lib.load_files({"train": str(train), "validation": str(valid)})
  assert texts["train"] == ["alpha beta gamma", "delta epsilon"]


def test_a_byte_order_mark_is_no_word(tmp_path):
  """A UTF-8 byte-order mark is dropped by both readers (training splits and --data_file),
  so the first word is the same word as without it."""
  train, valid = _two_files(tmp_path)
  train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())
  texts = data_lib.load_files({"train": str(train), "validation": str(valid)})
  assert texts["train"][0] == "alpha beta gamma"
  tok = WordTokenizer.build(texts["train"], 10)
  windows = data_lib.file_windows(str(train), tok, 2, "--data_file")
  assert windows[0, 0] == tok.index["alpha"]


def test_a_pipe_is_refused_as_not_a_regular_file(tmp_path):
  """A FIFO exists but can be read once: it could be neither hashed nor reread, so it is named
  as what it is, not as a missing file."""
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  with pytest.raises(data_lib.DataError, match="is not a regular file"):
    data_lib.check_text_file(str(fifo), "data.files.train")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_saying_which_way():
  """A vocabulary with more ids than model.vocab_size would index past the embedding table:
  refused, saying that fewer ids are fine (the message said 'they must agree', yet a smaller
  vocabulary is accepted)."""
  from infinito_jax.errors import DataError  # pylint: disable=import-outside-toplevel
  from infinito_jax.tokenizer import WordTokenizer  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  mc = model_config(c.model)
  built = data_lib.prepare(c, mc).tokenizer
  smaller = WordTokenizer(built.words[:len(built.words) // 2])
  assert data_lib.prepare(c, mc, tokenizer=smaller).tokenizer is smaller
  bigger = WordTokenizer(list(built.words) + [f"extra{i}" for i in range(mc.vocab_size)])
  with pytest.raises(DataError, match=rf"the tokenizer has {len(bigger)} ids, more than "
                                      rf"model.vocab_size={mc.vocab_size}: .*fewer is fine"):
    data_lib.prepare(c, mc, tokenizer=bigger)
