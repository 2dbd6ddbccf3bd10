"""ListOps at the CPU length with the basic attention mechanism: a bidirectional
GRU encoder and additive (Bahdanau) attention pooling, for comparison with
``listops_transformer`` on the same data (the recipe in ``_listops``).

Command: python run.py --experiment=listops_attention_pooling \
           --workdir=runs/listops_attention_pooling
"""

from experiments._listops import listops_config


def get_config():
  config = listops_config()
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 200

  config.model.name = "rnn_attention"
  config.model.embed_dim = 64
  config.model.hidden_dim = 128       # per direction
  config.model.attention_units = 128
  config.model.cell = "gru"
  return config
