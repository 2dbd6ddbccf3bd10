"""ResNet-18 with CBAM in every block on CIFAR-10 (needs internet and an accelerator).

Command: python run.py --experiment=cifar10_cnn_cbam --workdir=runs/cifar10_cnn_cbam
Data: ``tfds.load("cifar10")`` (50,000 train / 10,000 test), downloaded once.
Compare settings with ``--config.model.conv_attention=none|se|eca|cbam``.
Not run here (no internet on the build machines); its pipeline and a few
steps are tested on a locally prepared stand-in of the same TFDS dataset.
"""

from experiments._cifar10 import cifar10_config


def get_config():
  config = cifar10_config()
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 1_000
  config.optimizer.weight_decay = 5e-2   # decoupled (AdamW), so larger than SGD's 5e-4

  config.model.name = "resnet"
  config.model.widths = (64, 128, 256, 512)   # ResNet-18 for 32x32 inputs
  config.model.blocks_per_stage = 2
  config.model.conv_attention = "cbam"
  config.model.reduction = 16        # the CBAM paper's ratio
  config.model.spatial_kernel = 7

  config.viz.kind = "cnn"
  return config
