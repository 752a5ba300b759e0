"""The original's quick demo (vocab 5000, D 256, 3 layers, 4 heads) on the embedded corpus: offline."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.vocab_size = 5000
  c.model.hidden_dim = 256
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.data.source = "embedded"
  c.data.seq_len = 128
  c.train.batch_size = 16
  c.train.learning_rate = 1e-4
  c.train.epochs = 3
  c.seed = 42
  return c
