"""The word tokenizer: train-only vocabulary, reserved ids, stable round trips."""

import numpy as np
import pytest

from infinito_jax.tokenizer import EOS, PAD, UNK, WordTokenizer


def test_vocabulary_is_the_most_frequent_training_words_after_the_specials():
  tok = WordTokenizer.build(["b a a", "C c c b", ""], vocab_size=5)
  assert tok.words == ["<pad>", "<unk>", "<eos>", "c", "b"]  # a ties with b, seen later
  np.testing.assert_array_equal(tok.encode(["a C b zz"]), [UNK, 3, 4, UNK])


def test_literal_unk_in_the_text_is_counted_as_a_word_like_the_original():
  tok = WordTokenizer.build(["<unk> <unk> <unk> x"], vocab_size=10)
  assert tok.words == ["<pad>", "<unk>", "<eos>", "<unk>", "x"]
  assert tok.encode(["<unk> x y"]).tolist() == [3, 4, UNK]  # text <unk> != out of vocabulary
  again = WordTokenizer.from_json(tok.to_json())
  assert again.encode(["<unk> x y"]).tolist() == [3, 4, UNK]


def test_the_word_pad_in_a_text_is_a_word_never_the_padding_id():
  """The loss and the token count leave out id 0 (padding): the word "<pad>" in a text was
  encoded as 0 and silently dropped from scores and prompts. It is <unk> now, or its own id
  where the training text made it frequent enough; ids that read "<unk>" are both named."""
  tok = WordTokenizer.build(["a a b c"], vocab_size=10)
  assert tok.encode(["a <pad> b <pad>"]).tolist() == [3, UNK, 4, UNK]
  assert PAD not in tok.encode_prompt("<pad> <pad>").tolist()
  assert "<pad>" not in tok.index  # so evaluate names it among the unknown prompt words
  tok = WordTokenizer.build(["<pad> <pad> <pad> x"], vocab_size=10)
  assert tok.words[3] == "<pad>" and tok.encode(["<pad> x"]).tolist() == [3, 4]
  again = WordTokenizer.from_json(tok.to_json())
  assert again.encode(["<pad> x"]).tolist() == [3, 4]
  assert WordTokenizer.build(["x"], vocab_size=10).unknown_ids() == [UNK]
  assert WordTokenizer.build(["<unk> <unk> x"], vocab_size=10).unknown_ids() == [UNK, 3]


def test_eos_after_each_line_only_when_asked():
  tok = WordTokenizer.build(["a b"], vocab_size=10, add_eos=True)
  assert tok.encode(["a", "", "b"]).tolist() == [3, EOS, 4, EOS]
  assert WordTokenizer.build(["a b"], 10).encode(["a", "b"]).tolist() == [3, 4]


def test_json_round_trip_and_decode():
  tok = WordTokenizer.build(["the cat sat", "the end"], vocab_size=10, add_eos=True)
  again = WordTokenizer.from_json(tok.to_json())
  assert again.words == tok.words and again.add_eos
  assert again.decode([PAD] + tok.encode(["the cat"]).tolist()) == "the cat <eos>"
  # an id outside the vocabulary is an error, not the word at words[-1] (or an IndexError)
  for bad in (-1, len(tok.words)):
    with pytest.raises(ValueError, match=rf"ids \[{bad}\] lie outside the vocabulary"):
      tok.decode([3, bad])


def test_too_small_vocabulary_is_refused():
  with pytest.raises(ValueError, match="at least 4"):
    WordTokenizer.build(["a"], vocab_size=3)
