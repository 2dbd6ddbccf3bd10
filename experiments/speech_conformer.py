"""Conformer with attention pooling on the offline spoken commands: 12
classes, test voices never heard in training.

Command: python run.py --experiment=speech_conformer --workdir=runs/speech_conformer
Target: at least 95% test accuracy within 20 minutes on a 2-core CPU.
"""


from experiments._base import attention_config
from experiments._speech import speech_config


def get_config():
  config = speech_config()
  config.total_steps = 3000

  config.model.name = "conformer"
  config.model.hidden_dim = 96
  config.model.num_layers = 3
  config.model.num_heads = 4
  config.model.mlp_dim = 384         # the paper's 4x feed-forward expansion
  config.model.conv_kernel_size = 15
  config.model.subsample_channels = 32
  config.model.attention_units = 64
  config.model.max_distance = 32
  config.model.dropout_rate = 0.1
  config.model.attention = attention_config()
  return config
