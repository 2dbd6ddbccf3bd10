"""KWT-1 on TFDS ``speech_commands`` (v0.02, 12 classes): the published
setting, for an accelerator and a machine that can download the data.

Command: python run.py --experiment=speech_commands_kwt --workdir=runs/speech_commands_kwt
Reference: Berg et al. 2021 report about 98% test accuracy for KWT on the
12-class task (with 40 MFCCs; this front end gives 40 log-mel bands).
TFDS reads the WAV files with pydub; clips shorter than one second are
padded with silence (``data.audio.FIXED_LENGTHS``).
"""


from experiments._base import attention_config
from experiments._speech import speech_config


def get_config():
  config = speech_config("speech_commands")
  config.total_steps = 40_000        # ~120 epochs of the 85k training clips at batch 256
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.log_every = 200
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.optimizer.warmup_steps = 3000
  config.optimizer.weight_decay = 0.1

  config.model.name = "kwt"
  config.model.hidden_dim = 64       # KWT-1: 64 wide, 12 layers, 1 head, MLP 256
  config.model.num_layers = 12
  config.model.num_heads = 1
  config.model.mlp_dim = 256
  config.model.dropout_rate = 0.0
  config.model.attention = attention_config()
  config.model.pool = "cls"
  config.model.time_width = 25       # SpecAugment widths of the KWT paper
  config.model.freq_width = 7
  return config
