"""Keyframe detection in clips of moving digits: a per-frame CNN with CBAM,
a Transformer across frames, a keyframe logit per frame.

Data: ``moving_digits_offline`` (32 frames of 32x32; a keyframe where a digit
appears or changes class; a bar and drifting digits as distractor motion;
test clips from held-out digits only). Metrics: frame-level F1 (probability
>= 0.5) and average precision over the 500 test clips.

Command: python run.py --experiment=video_keyframes --workdir=runs/video_keyframes
Ablation flags: --config.model.conv_attention=none|se|eca|cbam
                --config.model.temporal=transformer|se|none
Target: frame-level F1 at least 0.9 on the held-out clips within 30 minutes
on a 2-core CPU; the measured numbers are in docs/results.md.
"""

from experiments._base import attention_config
from experiments._base import base_config


def get_config():
  config = base_config()
  config.task = "keyframes"
  config.total_steps = 1200
  config.batch_size = 16           # clips: 512 frames through the CNN per step
  config.eval_batch_size = 100
  config.eval_every = 400
  config.checkpoint_every = 400

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 1e-4

  config.data.name = "moving_digits_offline"

  config.model.name = "keyframe_detector"
  config.model.widths = (16, 32)       # 32x32 -> 16x16 -> 8x8 per frame
  config.model.conv_attention = "cbam"  # none | se | eca | cbam
  config.model.reduction = 4           # SE/CBAM bottleneck C/r (frame blocks, temporal SE)
  config.model.spatial_kernel = 7      # CBAM's spatial convolution, as in the paper
  config.model.temporal = "transformer"  # transformer | se | none
  # An event is a change from the frame before: the convolution over three
  # frames lets every variant compare neighbours.
  config.model.temporal_kernel = 3
  config.model.hidden_dim = 64
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.dropout_rate = 0.0
  config.model.attention = attention_config()

  config.viz.kind = "video"
  config.viz.num_examples = 3
  return config
