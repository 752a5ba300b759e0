"""The best recipe found for the demo architecture on WikiText-2 (issue 7's question).

The same model as configs/wikitext2_demo.py (vocab 5000, D 256, 3 layers, 4 heads, seq 128,
the same parameters and the same function evaluated); only the training recipe differs from the
original's (lr 1e-4, batch 16, no warmup, weight decay 0.01, dropout 0.1 on attention weights
and feed-forward, the same windows every epoch, 3 epochs):
- batch 8 (twice the updates per epoch), lr 1e-3 with 200 warmup steps, a cosine to 1e-5 over
  6 epochs, all of which run (the last, low-rate epochs bring most of the gain);
- AdamW weight decay 0.6;
- data.random_offsets: each epoch's windows start at another offset of the text;
- dropout 0.2 in the feed-forward block, none on the attention weights (fused attention).
Measured (train on the test split, validate on the validation split, 2-core CPU, each run on
one core beside another): best validation perplexity 123.31, 124.59, 123.15 for seeds 42, 43,
44, mean 123.7 +- 0.8 (95% t interval 121.7 - 125.6), reached in the last epoch; 824 - 852 s a
run. With model.dropout_bits=16 (cheaper masks), seed 42: 123.12. A first build of the new
knobs, whose feed-forward dropout masks came from other module names, had given 122.9, 124.4
and 123.2 (mean 123.5): the same recipe with other masks. The steps below used that build.
The steps that led here, seed 42, best validation perplexity:
  the previous recipe (5 epochs, weight decay 0.01, fixed windows)        138.4
  + random window offsets                                                 131.2
    + embed_dropout 0.1 and residual_dropout 0.1                          133.0
    + feed-forward dropout 0.3                                            132.1
    over 4 epochs / over 8 epochs (with the two dropouts above)         133.0 / 137.7
    + weight decay 0.1 / 0.3 / 0.6 / 1.0                      129.3 / 126.7 / 126.2 / 129.0
    + weight decay 0.6, over 6 epochs (this config)                       122.9
Earlier, without offsets: weight decay 0.1 + dropout 0.3 over 7 epochs 139.7 (stopped early by
patience 2, which also cut an 8-epoch run here at epoch 6: 139.1); lr 2e-3 + 300 warmup + b2
0.98 146.1; batch 4 + lr 7e-4 + 400 warmup + dropout 0.25 137.3; seq_len 256 at batch 4 139.5;
the memory read fused (model.fuse_memory) 138.3; an EMA of the weights (bench/ema_probe.py)
137.3 against 138.4.
With local files:
  python train.py --config configs/wikitext2_recipe.py --config.data.source=files \\
    --config.data.files.train=../shared/data/wikitext-2/test.txt \\
    --config.data.files.validation=../shared/data/wikitext-2/valid.txt
"""

from configs import wikitext2_demo


def get_config():
  c = wikitext2_demo.get_config()
  c.train.batch_size = 8
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 200
  c.train.epochs = 6
  c.train.cosine_epochs = 6
  c.train.min_learning_rate = 1e-5
  c.train.weight_decay = 0.6
  c.train.patience = 6  # the whole cosine: the gain comes in its last, low-rate epochs
  c.model.dropout = 0.2
  c.model.attention_dropout = 0.0
  c.data.random_offsets = True
  return c
