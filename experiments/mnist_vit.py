"""A small ViT on the offline MNIST 5k digits (4,000 train / 1,000 test).

Command: python run.py --experiment=mnist_vit --workdir=runs/mnist_vit
Target: at least 97% test accuracy within 10 minutes on a 2-core CPU.
"""


from experiments._base import attention_config
from experiments._mnist import mnist_config


def get_config():
  config = mnist_config()
  config.batch_size = 128
  config.label_smoothing = 0.0

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.05

  config.data.augment_shift = 2      # ViT lacks translation invariance; 4k digits teach little of it

  config.model.name = "vit"
  config.model.patch_size = 4        # 7x7 = 49 patches + CLS
  config.model.hidden_dim = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.dropout_rate = 0.0    # 4k digits, 3k steps: the model underfits, dropout only slowed it
  # Kernel, dropout, mods, rotary embeddings...: unset = each backend's default.
  config.model.attention = attention_config()
  config.model.pool = "cls"
  # Two stride-2 3x3 convolutions down to the 7x7 patch grid instead of one
  # 4x4 patch projection: measured here 98.5% vs 97.1% for "patch" at 3,000 steps.
  config.model.stem = "conv"
  return config
