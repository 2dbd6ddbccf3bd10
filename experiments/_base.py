"""Fields every experiment has; each experiment overrides what it needs.

Every hyper-parameter the training loop reads is defined here or in the
experiment file: the loop has no defaults of its own.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = ""             # set from the file name by experiments.get_config
  config.seed = 0                    # model init, data order, dropout, augmentation
  config.task = "classification"
  config.total_steps = 1000
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  # True: orbax writes checkpoints on a background thread while training goes
  # on (a kill mid-write still leaves only complete checkpoints).
  config.async_checkpoints = False
  config.label_smoothing = 0.0
  config.debug_nans = False          # JAX's NaN checking: stops at the op that made a NaN (slow)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.end_factor = 0.01   # final LR = learning_rate * end_factor
  config.optimizer.weight_decay = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.grad_clip = 1.0     # global-norm clipping

  config.data = ml_collections.ConfigDict()
  config.data.name = ""
  config.data.data_dir = ""          # "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.augment_shift = 0      # max random translation: pixels (images), samples (audio)
  config.data.augment_flip = False   # random left-right mirror (natural images)
  config.data.grayscale = False      # colour images -> one luminance channel
  config.data.max_length = 0         # text: tokens per example (padding / truncation length)
  config.data.prefetch = 2           # batches built ahead on a background thread; 0: none

  # Devices: a (data, sequence) mesh over all of them (train/sharding.py).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1              # batch split over this many devices; -1: all the rest
  config.mesh.sequence = 1           # sequence split over this many (the ring kernel)
  config.mesh.shard_params = False   # False: replicate parameters and optimiser state
  config.distributed = False         # multi-host: jax.distributed.initialize() at start

  config.model = ml_collections.ConfigDict()
  # Compute dtype of activations: "auto" (bfloat16 on a TPU, float32
  # elsewhere), "float32", "bfloat16" (TPUs, Ampere and newer GPUs: half the
  # memory traffic, same exponent range as float32) or "float16" (older GPUs;
  # no loss scaling here, so its gradients can underflow in training).
  # Parameters, softmax, loss and metrics stay float32.
  config.model.dtype = "auto"

  config.viz = ml_collections.ConfigDict()
  config.viz.kind = "image"
  config.viz.num_examples = 4
  return config


def attention_config(**settings) -> ml_collections.ConfigDict:
  """``config.model.attention``: every field of ``layers.AttentionConfig``,
  so any of them can be set from the command line
  (``--config.model.attention.score_mod=alibi``), with ``settings`` applied.

  kernel: a registry name or per-platform pin; unset: each platform's
    automatic choice. window: ``w`` or ``(left, right)``. score_mod /
    mask_mod: names from ``kernels.mods.names()`` (their keyword arguments in
    ``score_mod_args`` / ``mask_mod_args``). rotary: ``1d`` or ``2d``.
    num_kv_heads: grouped-query attention. options: kernel options.
  """
  attention = ml_collections.ConfigDict()
  attention.kernel = config_dict.placeholder(str)
  attention.dropout_rate = 0.0
  attention.window = config_dict.placeholder(object)
  attention.score_mod = config_dict.placeholder(str)
  attention.score_mod_args = ml_collections.ConfigDict()
  attention.mask_mod = config_dict.placeholder(str)
  attention.mask_mod_args = ml_collections.ConfigDict()
  attention.rotary = config_dict.placeholder(str)
  attention.rotary_base = 10000.0
  attention.qk_norm = False
  attention.sinks = False
  attention.num_kv_heads = config_dict.placeholder(int)
  attention.options = ml_collections.ConfigDict()
  for key, value in settings.items():
    if key not in attention:
      raise ValueError(f"attention_config: no field {key!r}; fields: {', '.join(attention)}")
    attention[key] = value
  return attention
