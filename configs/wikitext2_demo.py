"""The demo settings (vocab 5000, D 256, 3 layers, 4 heads, batch 16, seq 128, 3 epochs) on WikiText-2."""

from configs import demo


def get_config():
  c = demo.get_config()
  c.data.source = "hub"  # Salesforce/wikitext, wikitext-2-raw-v1 (default.py)
  return c
