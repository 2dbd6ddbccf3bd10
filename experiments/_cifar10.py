"""What the natural-image CIFAR-10 experiments share (``cifar10_vit``,
``cifar10_cnn_cbam``): TFDS ``cifar10``, the usual pad-4 random crop and
mirror, ten classes, 40,000 steps of 128 (about 100 epochs) with an evaluation
and a checkpoint every 2,000. ``cifar10_pixel_transformer`` follows Long Range
Arena's recipe instead (grey-scale, no augmentation, its own budget)."""

from experiments._base import base_config


def cifar10_config():
  config = base_config()
  config.total_steps = 40_000        # ~100 epochs at batch 128
  config.batch_size = 128
  config.eval_every = 2_000
  config.checkpoint_every = 2_000

  config.data.name = "cifar10"
  config.data.augment_shift = 4      # the usual pad-4 random crop
  config.data.augment_flip = True

  config.model.num_classes = 10
  return config
