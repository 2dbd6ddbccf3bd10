"""ListOps at Long Range Arena's full length, with LRA's Transformer: for accelerators.

Command: python run.py --experiment=listops_lra_transformer \
           --workdir=runs/listops_lra_transformer
Data: ``listops_offline/lra``, generated offline with LRA's recipe (lengths
strictly between 500 and 2,000 tokens, 96,000 / 2,000 / 2,000 examples);
generating it once takes minutes on one core. Model and budget follow LRA's
ListOps Transformer (Tay et al. 2021 report 36.4% test accuracy): 4 layers,
8 heads, width 512, MLP 1,024, CLS pooling, batch 32, 5,000 steps. Not run to
the end on the 2-core build machine (a few steps are tested).
"""

from experiments import listops_transformer
from experiments._base import attention_config


def get_config():
  config = listops_transformer.get_config()
  config.total_steps = 5000
  config.batch_size = 32
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 1000

  config.data.name = "listops_offline/lra"
  config.data.max_length = 2000

  config.model.hidden_dim = 512
  config.model.num_layers = 4
  config.model.num_heads = 8
  config.model.mlp_dim = 1024
  config.model.dropout_rate = 0.1
  config.model.attention = attention_config()   # each backend's fast kernel at 2,000 tokens
  return config
