"""A small ViT on CIFAR-10 (needs internet and an accelerator).

Command: python run.py --experiment=cifar10_vit --workdir=runs/cifar10_vit
Data: ``tfds.load("cifar10")``. 8x8 = 64 patches of 4x4 pixels plus CLS.
Not run here (no internet on the build machines); its pipeline and a few
steps are tested on a locally prepared stand-in of the same TFDS dataset.
"""


from experiments._base import attention_config
from experiments._cifar10 import cifar10_config


def get_config():
  config = cifar10_config()
  config.label_smoothing = 0.1

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2_000
  config.optimizer.weight_decay = 0.05

  config.model.name = "vit"
  config.model.patch_size = 4
  config.model.hidden_dim = 256
  config.model.num_layers = 6
  config.model.num_heads = 8
  config.model.mlp_dim = 512
  config.model.dropout_rate = 0.1    # 50k images: a ViT this size overfits without it
  config.model.attention = attention_config()
  config.model.pool = "cls"
  config.model.stem = "conv"
  return config
