"""ListOps at the CPU length with the basic attention mechanism: a bidirectional
GRU encoder and additive (Bahdanau) attention pooling, for comparison with
``listops_transformer`` on the same data.

Command: python run.py --experiment=listops_attention_pooling \
           --workdir=runs/listops_attention_pooling
"""

from experiments._base import base_config


def get_config():
  config = base_config()
  config.total_steps = 6000
  config.batch_size = 32
  config.eval_batch_size = 250
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.01

  config.data.name = "listops_offline/short"
  config.data.max_length = 256

  config.model.name = "rnn_attention"
  config.model.num_classes = 10
  config.model.vocab_size = 16
  config.model.embed_dim = 64
  config.model.hidden_dim = 128       # per direction
  config.model.attention_units = 128
  config.model.cell = "gru"
  config.model.dropout_rate = 0.1

  config.viz.kind = "text"
  return config
