"""All knobs of a run, grouped; other configs import this and change a handful of fields."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42  # one base key: model init, dropout/noise (fold_in step) and data order (fold_in epoch)

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 5000  # V: ids in [0, V); the tokenizer keeps the V - 3 most frequent train words
  m.hidden_dim = 512  # D: model width (divisible by num_heads)
  m.num_layers = 6  # L: transformer layers
  m.num_heads = 8  # H: attention heads
  m.memory_slots = 256  # S: priority-memory slots
  m.slot_size = 64  # width of one memory slot (64 in the original)
  m.max_len = 1000  # rows of the position table: the longest sequence accepted
  m.dropout = 0.1  # on attention weights and in the feed-forward block
  # on attention weights alone (None: model.dropout); 0 lets training use fused attention
  m.attention_dropout = ml_collections.FieldReference(None, field_type=float)
  # training-only dropout on the embeddings entering the first layer, and on the attention
  # block's output before its residual add (0: none, as the original; the same model evaluated)
  m.embed_dropout = 0.0
  m.residual_dropout = 0.0
  # random bits per dropout decision: 32 (nn.Dropout, as every earlier run) or 16 (two
  # decisions per threefry word: masks about 3x cheaper on a CPU; other masks of the same seed)
  m.dropout_bits = 32
  m.exploration = True  # Gaussian noise * learnable scale after each layer in training
  m.noise_scale = 0.1  # initial exploration scale
  m.causal = True  # mask future positions (False only reproduces the original's numbers)
  m.fuse_memory = False  # add a causal memory read to the output (the original discards it)
  m.dtype = "float32"  # computation dtype: float32 or bfloat16 (float16 runs, unscaled)
  # one nn.scan over layers stacked on a leading axis: compiles in about one layer's time
  # (another parameter layout and other random streams: a run keeps its choice)
  m.scan_layers = False
  # recompute layer activations in the backward pass: same numbers, less memory with scan_layers
  m.remat = False
  # what a recomputed layer keeps: 'nothing' or 'dots' (its matrix products' outputs)
  m.remat_policy = "nothing"
  # kernel of the fused attention path: 'auto' (cuDNN flash attention on a GPU in bfloat16,
  # XLA elsewhere), 'xla', 'cudnn' or 'pallas' (Pallas' flash attention on a GPU, float32 too)
  m.attention_impl = "auto"

  c.data = d = ml_collections.ConfigDict()
  d.source = "hub"  # 'hub' (Hugging Face), 'files' (local text files) or 'embedded' (offline)
  d.hub_name = "Salesforce/wikitext"  # hub dataset id (source=hub)
  d.hub_config = "wikitext-2-raw-v1"  # hub dataset config (source=hub)
  d.files = ml_collections.ConfigDict()  # source=files: one text per line
  d.files.train = ""  # path of the training text (the vocabulary is built from it alone)
  d.files.validation = ""  # path of the validation text
  d.files.test = ""  # path of the test text (optional)
  d.seq_len = 256  # T: tokens per window (windows of T + 1 give inputs and targets)
  d.add_eos = False  # append <eos>=2 after each line (the original does not)
  # each epoch, start the training windows at a random offset in [0, seq_len] of the text
  # (a pure function of seed and epoch; the windows wrap around the end): other contexts each
  # epoch, the same number of batches. False: the same windows every epoch, as the original
  d.random_offsets = False
  d.corpus = ml_collections.ConfigDict()  # source=embedded: the seeded corpus (see corpus.py)
  d.corpus.seed = ml_collections.FieldReference(None, field_type=int)  # None: use `seed`
  d.corpus.num_words = 1000  # distinct words of the source
  d.corpus.num_classes = 24  # word classes of its second-order chain
  d.corpus.successors = 2  # classes that commonly follow each pair of classes
  d.corpus.smoothing = 0.02  # mass spread over all classes (keeps the chain ergodic)
  d.corpus.zipf = 1.1  # within-class word frequency exponent
  d.corpus.train_words = 300_000  # length of the training split
  d.corpus.validation_words = 20_000  # length of the validation split
  d.corpus.test_words = 20_000  # length of the test split
  d.corpus.words_per_line = 20  # line length of the generated text

  c.train = t = ml_collections.ConfigDict()
  t.epochs = 15  # most epochs to train
  t.batch_size = 32  # global batch, split over all local devices
  t.replicas = 1  # N: a population of N independent runs trained together in one jitted step
  t.seed_stride = 1  # replica r is the run of seed + r * seed_stride (0: N copies of one key)
  # G groups of optimisation values trained together: 'k=v,...;k=v,...' (keys: learning_rate,
  # min_learning_rate, warmup_steps, cosine_epochs, weight_decay, b1, b2, eps, clip_norm; an
  # empty group keeps train.*). Replica r is in group r // (replicas / G), with seed
  # seed + (r % (replicas / G)) * seed_stride. "": every replica the train.* values.
  t.replica_hparams = ""
  t.learning_rate = 1e-4  # AdamW peak learning rate
  t.min_learning_rate = 1e-6  # cosine annealing floor (torch eta_min)
  t.cosine_epochs = 20  # cosine period in epochs: T_max = steps_per_epoch * cosine_epochs
  t.warmup_steps = 0  # linear warmup before the cosine (0: none, as the original)
  t.weight_decay = 0.01  # AdamW decoupled weight decay (torch's default)
  t.b1 = 0.9  # Adam beta1
  t.b2 = 0.999  # Adam beta2
  t.eps = 1e-8  # Adam epsilon
  t.clip_norm = 1.0  # global gradient-norm clip
  t.patience = 3  # early stopping: epochs without a better validation loss
  t.log_every = 20  # steps between fetching train metrics (and checking the loss is finite)
  # a replica of a population whose loss or gradient norm becomes NaN or inf: 'freeze' keeps
  # its weights from before that step and the others train on (the run stops once all have);
  # 'stop' ends the run. One replica: the run stops either way
  t.on_divergence = "freeze"
  t.eval_batch_size = 0  # validation batch (0: same as batch_size)
  t.num_devices = 0  # devices of the data-parallel mesh (0: all local devices)
  t.sharding = "replicated"  # parameters on every device, or 'fsdp': sliced over the devices
  t.eval_every_steps = 0  # also validate every N steps inside epochs (0: only at epoch ends)
  t.stop_after_steps = 0  # stop, save and exit at this global step as if interrupted (0: never)
  t.allow_changes = False  # resume with a changed recipe (learning rate, dropout...): recorded
  # positions per chunk of the output projection + cross-entropy in training (0: all at once):
  # the [batch, seq_len, vocab] logits are never held whole; the same loss to float rounding
  t.loss_chunk = 0
  t.grad_accum_steps = 1  # K: each step sums gradients over K micro-batches of batch_size / K
  t.sample_prompt = ""  # if set, sample a continuation of it at each validation (fixed key)
  t.sample_tokens = 40  # words sampled after train.sample_prompt
  t.rng_impl = "threefry"  # PRNG of init, dropout and noise: threefry, rbg or unsafe_rbg (faster on GPUs)
  # on a GPU, threefry's random bits from JAX's CUDA kernel instead of inlined XLA code: the
  # same bits (same run), faster compiles (jax_threefry_gpu_kernel_lowering); no effect elsewhere
  t.threefry_kernel = False
  t.compilation_cache = "~/.cache/infinito_jax/jax"  # JAX's persistent compilation cache ("": off)
  t.profile_steps = ""  # "N,M": write a jax.profiler trace of steps N..M-1 to <workdir>/profile

  c.log = g = ml_collections.ConfigDict()
  g.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard (tensorboardX)
  g.wandb_project = ""  # if set, also log to this Weights & Biases project (pip install -e ".[wandb]")
  g.wandb_entity = ""  # W&B entity (team or user; empty: your default)
  g.plot = True  # write <workdir>/curves.png (loss and perplexity against steps) at the end

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 0  # also save every N steps inside an epoch (0: only at epoch ends)
  k.keep_best = True  # keep the best checkpoint by validation loss besides the latest
  k.on_damage = "stop"  # unreadable latest step: 'stop' and say so, or 'previous' (resume older)
  return c
