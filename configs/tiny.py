"""A tiny model on a tiny embedded corpus, for tests and smoke runs (seconds on a CPU)."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.vocab_size = 128
  c.model.hidden_dim = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.memory_slots = 8
  c.model.max_len = 64
  c.data.source = "embedded"
  c.data.seq_len = 16
  c.data.corpus.num_words = 100
  c.data.corpus.num_classes = 8
  c.data.corpus.train_words = 4000
  c.data.corpus.validation_words = 1000
  c.data.corpus.test_words = 1000
  c.train.batch_size = 8
  c.train.learning_rate = 3e-3
  c.train.epochs = 2
  c.train.log_every = 5
  return c
