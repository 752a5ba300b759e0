"""The demo settings (vocab 5000, D 256, 3 layers, 4 heads, batch 16, seq 128, 3 epochs) on WikiText-2."""

from configs import default, demo


def get_config():
  c = demo.get_config()
  c.data.source = "hub"
  c.data.hub_name = default.get_config().data.hub_name
  c.data.hub_config = default.get_config().data.hub_config
  return c
