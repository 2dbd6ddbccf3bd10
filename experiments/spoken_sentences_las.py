"""Speech recognition with attention (Listen, Attend and Spell style): a
Transformer encoder over subsampled log-mel frames and a Transformer decoder
that writes characters while cross-attending to them, on the offline spoken
sentences (commands and digit strings from a small grammar, eSpeak NG voices,
validation and test voices never heard in training).

Command: python run.py --experiment=spoken_sentences_las --workdir=runs/spoken_sentences_las
Try it: add --mode=predict --inputs=0 --inputs=1 (test-split indices) or --inputs=said.wav
(a 16 kHz WAV of at most two seconds) to the command.
Pictures: --mode=visualize draws each transcript's characters over the spectrogram.
Metrics: word and character error rates (jiwer) of the greedy transcript, exact match.
Target: word error rate at most 5% on unheard voices within 30 minutes on a 2-core CPU
(measured: 1.72% in 20.3 minutes, timed on a shared machine; docs/results.md).
"""

from experiments._base import attention_config
from experiments._base import base_config
from attention_lab.data import spoken_sentences


def get_config():
  config = base_config()
  config.task = "speech_recognition"
  config.batch_size = 32
  config.eval_batch_size = 200
  config.log_every = 100
  config.total_steps = 5000       # WER 5.0% at step 2,000, 1.7% at 4,000 and 5,000
  config.eval_every = 1000
  config.checkpoint_every = 500

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 300
  config.optimizer.weight_decay = 0.01

  config.data.name = "spoken_sentences_offline"
  config.data.train_split = "train"
  config.data.eval_split = "test"

  config.model.name = "speech_recognizer"
  config.model.vocab_size = len(spoken_sentences.CHARS)
  config.model.target_length = spoken_sentences.TARGET_LENGTH
  config.model.num_layers = 2         # encoder blocks over the frames, and decoder blocks
  config.model.num_heads = 4
  config.model.hidden_dim = 128
  config.model.mlp_dim = 256
  config.model.subsample_channels = 32
  config.model.dropout_rate = 0.1
  config.model.num_mels = 40          # log-mel bands, 25 ms windows every 10 ms
  config.model.max_warp = 0.1         # frequency warp in training: other vocal tracts
  config.model.time_masks = 2         # SpecAugment in training
  config.model.time_width = 10
  config.model.freq_masks = 2
  config.model.freq_width = 5
  # Kernel, attention dropout, kernel options: unset = each backend's default.
  # The cached decoder takes no window, mod, rotary, qk-norm or grouped K/V.
  config.model.attention = attention_config()

  config.viz.kind = "transcript"
  config.viz.num_examples = 4
  return config
