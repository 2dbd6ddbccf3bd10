"""What the ListOps experiments at the CPU length share: the offline short
setting (expressions strictly between 32 and 256 tokens, LRA's operators,
depth and arity), ten answer classes, 6,000 steps of batch 32 with an
evaluation and a checkpoint every 1,000, and pictures of the tokens."""

from experiments._base import base_config


def listops_config():
  config = base_config()
  config.total_steps = 6000
  config.batch_size = 32
  config.eval_batch_size = 250
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000

  config.optimizer.weight_decay = 0.01

  config.data.name = "listops_offline/short"
  config.data.eval_split = "test"
  config.data.max_length = 256        # the longest expression of the short setting is 255

  config.model.num_classes = 10
  config.model.vocab_size = 16        # pad, 4 operators, "]", 10 digits
  config.model.dropout_rate = 0.1

  config.viz.kind = "text"
  return config
