"""The original's full run on WikiText-2 from the hub: vocab 10000, D 512, 6 layers, 8 heads, 256 slots."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.vocab_size = 10000
  c.model.hidden_dim = 512
  c.model.num_layers = 6
  c.model.num_heads = 8
  c.model.memory_slots = 256
  c.data.source = "hub"
  c.data.seq_len = 256
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4
  c.train.epochs = 15
  c.train.patience = 3
  c.train.cosine_epochs = 20
  return c
