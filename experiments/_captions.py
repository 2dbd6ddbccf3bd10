"""What the MNIST captioning experiments share: the captioned digit scenes
(``mnist_captions_offline``: 64x64 scenes of two to four digits, captions
from a small grammar, test scenes from the 1,000 held-out digits), the
captioning task (exact caption match and token accuracy of the greedy
caption, word-level BLEU-4 from sacrebleu) and the attention pictures.
"""

from attention_lab.data import captions
from experiments._base import base_config


def captions_config():
  config = base_config()
  config.task = "captioning"
  config.batch_size = 64
  config.eval_batch_size = 500
  config.log_every = 100

  config.data.name = "mnist_captions_offline"
  config.data.eval_split = "test"

  config.model.vocab_size = len(captions.WORDS)       # pad, bos, eos + words
  config.model.target_length = captions.TARGET_LENGTH  # four phrases, three "and", <eos>
  # 64 -> 32 -> 16 -> 8: an 8x8 grid of regions, 8x8 pixels each, so a
  # quadrant is 4x4 regions and a small digit two to three regions across.
  config.model.widths = (16, 32, 64)
  config.model.dropout_rate = 0.0

  config.viz.kind = "caption"
  config.viz.num_examples = 4
  return config
