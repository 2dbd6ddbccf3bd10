"""Long Range Arena "Image": CIFAR-10 in grey-scale as 1,024 pixel tokens.

Command: python run.py --experiment=cifar10_pixel_transformer \
           --workdir=runs/cifar10_pixel_transformer
Needs internet (``tfds.load("cifar10")``) and an accelerator. The model and
optimiser follow LRA's Transformer config (Tay et al. 2021, which reports
42.4% test accuracy for the vanilla Transformer): 1 layer, 1 head, width 32,
MLP 64, dropout 0.3 / 0.2, CLS pooling, batch 256, 200 epochs of 45,000
training images at learning rate 5e-4 with no weight decay. Not run here (no
internet on the build machines); its pipeline and a few steps are tested on a
locally prepared stand-in of the same TFDS dataset.
"""


from experiments._base import attention_config
from experiments._base import base_config


def get_config():
  config = base_config()
  config.batch_size = 256
  config.total_steps = 45_000 // 256 * 200   # 35,000
  config.eval_every = 45_000 // 256          # once an epoch
  config.checkpoint_every = 45_000 // 256 * 10
  config.eval_batch_size = 500

  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 45_000 // 256   # one epoch
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip = 1e9           # LRA does not clip

  config.data.name = "cifar10"
  config.data.train_split = "train[:90%]"    # 45,000 images, as in LRA
  config.data.eval_split = "test"
  config.data.grayscale = True

  config.model.name = "pixel_transformer"
  config.model.num_classes = 10
  config.model.hidden_dim = 32
  config.model.num_layers = 1
  config.model.num_heads = 1
  config.model.mlp_dim = 64
  config.model.dropout_rate = 0.3
  config.model.attention = attention_config(dropout_rate=0.2)
  config.model.pool = "cls"
  return config
