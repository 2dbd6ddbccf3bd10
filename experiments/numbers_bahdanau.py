"""Numbers in English words -> German words with an RNN encoder-decoder and
Bahdanau (additive) attention: the baseline beside ``numbers_transformer``.

Command: python run.py --experiment=numbers_bahdanau --workdir=runs/numbers_bahdanau
Data: ``numbers_offline/de`` (see ``numbers_transformer``): the same numbers,
the same held-out test numbers, the same metrics (exact match and
character-level BLEU of the greedy translation).
"""

from attention_lab.data import numbers
from experiments._base import base_config


def get_config():
  config = base_config()
  config.task = "seq2seq"
  config.total_steps = 2000
  config.batch_size = 64
  config.eval_batch_size = 500
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.0

  config.data.name = "numbers_offline/de"
  config.data.eval_split = "test"
  config.data.max_length = 0          # 0: the longest English number

  config.model.name = "seq2seq"
  config.model.vocab_size = len(numbers.CHARS)
  config.model.target_length = numbers.TARGET_LENGTHS["de"]
  config.model.score = "bahdanau"
  config.model.embed_dim = 32
  config.model.hidden_dim = 64        # per encoder direction; the decoder has 128
  config.model.attention_units = 64
  config.model.cell = "gru"
  config.model.dropout_rate = 0.0

  config.viz.kind = "alignment"
  config.viz.num_examples = 4
  return config
