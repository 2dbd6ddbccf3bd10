"""Keyword Transformer (KWT) on the offline spoken commands: 12 classes,
test voices never heard in training.

Command: python run.py --experiment=speech_kwt --workdir=runs/speech_kwt
Target: at least 95% test accuracy within 20 minutes on a 2-core CPU.
"""


from experiments._base import attention_config
from experiments._speech import speech_config


def get_config():
  config = speech_config()
  config.total_steps = 4000

  config.model.name = "kwt"
  config.model.hidden_dim = 64       # KWT-1 is 64 wide and 12 deep; 4 layers fit a CPU budget
  config.model.num_layers = 4
  config.model.num_heads = 2
  config.model.mlp_dim = 128
  config.model.dropout_rate = 0.0
  config.model.attention = attention_config()
  config.model.pool = "cls"
  return config
