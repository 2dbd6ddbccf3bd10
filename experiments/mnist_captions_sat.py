"""Captioning scenes of MNIST digits with "Show, Attend and Tell" (Xu et al.
2015): a CNN's 8x8 grid of regions, an LSTM decoder with additive soft
attention over them and the doubly stochastic attention regulariser.

Command: python run.py --experiment=mnist_captions_sat --workdir=runs/mnist_captions_sat
Data: ``mnist_captions_offline`` (``experiments/_captions.py``), captions such
as ``a large 3 at the top left and a small 7 at the bottom right``.
Metrics: exact caption match, token accuracy and word-level BLEU-4 (sacrebleu,
0-100) of the greedy caption. Try it: ``--mode=predict --inputs=0 --inputs=7``
(test scene indices, or paths of 64x64 grey images); ``--mode=visualize``
draws each word's attention over the image.
Target: at least 90% exact caption match and BLEU-4 at least 90 on the
held-out scenes within 30 minutes on a 2-core CPU. Measured (docs/results.md):
91.6% and 99.0 in 32.8 minutes on a shared 2-core CPU (load average 5 to 9).
"""

from experiments._captions import captions_config


def get_config():
  config = captions_config()
  config.total_steps = 3000
  config.eval_every = 1000
  config.checkpoint_every = 500

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.0

  config.model.name = "show_attend_tell"
  config.model.features = 128          # region feature width
  config.model.embed_dim = 64
  config.model.hidden_dim = 256        # LSTM
  config.model.attention_units = 64
  # lambda of sum_i (1 - sum_t alpha_ti)^2, per caption word (the paper: 1).
  config.model.doubly_stochastic = 1.0
  return config
