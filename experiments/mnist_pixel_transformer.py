"""The pixel-sequence Transformer on the offline MNIST 5k: 784 pixel tokens.

Command: python run.py --experiment=mnist_pixel_transformer \
           --workdir=runs/mnist_pixel_transformer
The CPU-sized counterpart of ``cifar10_pixel_transformer`` (Long Range Arena
"Image"): no patches and no convolutions, so whatever the model knows of 2-D
structure it learns through attention over 785 positions.
"""

from experiments._base import attention_config
from experiments._mnist import mnist_config


def get_config():
  config = mnist_config()
  config.batch_size = 32

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.01

  config.model.name = "pixel_transformer"
  # LRA's image-task Transformer size (1 layer, 1 head, width 32, MLP 64).
  config.model.hidden_dim = 32
  config.model.num_layers = 1
  config.model.num_heads = 1
  config.model.mlp_dim = 64
  config.model.dropout_rate = 0.0
  # Measured here at 785 tokens, 1 head of 32: blockwise 0.15 s/step, jax_nn
  # 0.23 (the automatic choice below 1,024 keys, tuned for 8 heads of 64).
  # Pinned on CPU only; GPU and TPU choose their fused kernels automatically.
  config.model.attention = attention_config(kernel="cpu=blockwise")
  config.model.pool = "cls"
  return config
