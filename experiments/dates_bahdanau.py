"""Dates to ISO 8601 with an RNN encoder-decoder and Bahdanau (additive) attention.

Command: python run.py --experiment=dates_bahdanau --workdir=runs/dates_bahdanau
Data: ``dates_offline``: human-readable dates in many formats ("3 May 1998",
"05/03/98", "Tuesday, May 3 1998", ...) -> "1998-05-03", generated offline;
test dates are calendar days never seen in training. Target: at least 99%
exact match on the test dates within 15 minutes on a 2-core CPU.
"""

from attention_lab.data import dates
from experiments._base import base_config


def get_config():
  config = base_config()
  config.task = "seq2seq"
  config.total_steps = 3000
  config.batch_size = 64
  config.eval_batch_size = 500
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.0

  config.data.name = "dates_offline"
  config.data.eval_split = "test"
  config.data.max_length = 0          # 0: the longest source format

  config.model.name = "seq2seq"
  config.model.vocab_size = len(dates.CHARS)       # pad, bos, eos + characters
  config.model.target_length = dates.TARGET_LENGTH  # "YYYY-MM-DD" + <eos>
  config.model.score = "bahdanau"
  config.model.embed_dim = 32
  config.model.hidden_dim = 64        # per encoder direction; the decoder has 128
  config.model.attention_units = 64
  config.model.cell = "gru"
  config.model.dropout_rate = 0.0

  config.viz.kind = "alignment"
  config.viz.num_examples = 6
  return config
