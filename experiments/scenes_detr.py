"""Object detection in digit scenes with DETR: a CNN backbone, a Transformer
encoder over its 8x8 feature grid, learned object queries decoded with
cross-attention, Hungarian matching (class + L1 + GIoU) as the loss.

Data: ``digit_scenes_offline`` (64x64 scenes of one to five MNIST digits of
16 to 28 pixels, a little overlap, digit fragments as clutter; 30,000 train
scenes, 1,000 test scenes from held-out digits only). Any TFDS detection
dataset reads through the same pipeline (``--config.data.name=voc/2007
--config.model.num_classes=20``; its images are resized to
``data.image_size``). Metrics: COCO mAP@[.5:.95] and mAP@.5 (pycocotools)
over the test scenes.

Command: python run.py --experiment=scenes_detr --workdir=runs/scenes_detr
Target: mAP@.5 at least 0.9 on the held-out scenes within 30 minutes on a
2-core CPU. Measured (seed 0, shared machine): mAP@.5 0.918, mAP@[.5:.95]
0.626 after 26.4 min of training (33 min for the whole command with the
first preparation of the data); details in docs/results.md.
"""

import ml_collections

from experiments._base import attention_config
from experiments._base import base_config


def get_config():
  config = base_config()
  config.task = "detection"
  config.total_steps = 7000
  config.batch_size = 32
  config.eval_batch_size = 250
  config.log_every = 100
  config.eval_every = 3500
  config.checkpoint_every = 1000

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 1e-4
  config.optimizer.grad_clip = 0.1     # DETR's clipping: the matched loss jumps when assignments change

  config.data.name = "digit_scenes_offline"
  config.data.image_size = 64          # images are resized to this square (ours are made at it)
  config.data.max_objects = 5          # objects kept per image (ours have at most 5)

  # DETR's weights: class 1, L1 5, GIoU 2 in both the matching cost and the
  # loss; "no object" weighted 0.1 against the many unmatched queries.
  config.detection = ml_collections.ConfigDict()
  config.detection.class_weight = 1.0
  config.detection.l1_weight = 5.0
  config.detection.giou_weight = 2.0
  config.detection.no_object_weight = 0.1
  config.detection.aux_loss = True     # a matched loss on every decoder layer

  config.model.name = "detr"
  config.model.num_classes = 10
  # The stem at stride 2 keeps the backbone's cost (most of a step's) low:
  # 64x64 -> 32 (stem) -> 16 -> 8x8 cells.
  config.model.stem_stride = 2
  config.model.widths = (32, 64)
  config.model.hidden_dim = 96
  config.model.num_encoder_layers = 2
  config.model.num_decoder_layers = 3
  config.model.num_heads = 4
  config.model.mlp_dim = 192
  config.model.num_queries = 12        # more than the 5 objects a scene can hold
  config.model.dropout_rate = 0.0
  config.model.attention = attention_config()

  config.viz.kind = "detection"
  config.viz.num_examples = 4
  return config
