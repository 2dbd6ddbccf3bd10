"""Where examples come from: local TFDS builders offline, ``tfds.load`` online.

Both paths go through tensorflow-datasets and end in the same numpy arrays, so
the code a user runs with internet is the code the offline tests run.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data.builders.mnist_offline import MnistOffline

# Builders prepared locally from packaged or generated data (no network).
LOCAL_BUILDERS = {
    "mnist_offline": MnistOffline,
}


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               download: bool = True) -> Dict[str, np.ndarray]:
  """All examples of one split as numpy arrays, keyed by feature name.

  Args:
    name: a ``LOCAL_BUILDERS`` name or any TFDS dataset name.
    split: a TFDS split string (``train``, ``test``, ``train[:90%]``...).
    data_dir: TFDS data directory; None for TFDS's default.
    download: for online names, allow ``tfds.load`` to download and prepare.
  """
  tfds.disable_progress_bar()
  data_dir = data_dir or None
  if name in LOCAL_BUILDERS:
    builder = LOCAL_BUILDERS[name](data_dir=data_dir)
    builder.download_and_prepare()
    dataset = builder.as_dataset(split=split, batch_size=-1)
  else:
    dataset = tfds.load(name, split=split, data_dir=data_dir, batch_size=-1,
                        download=download)
  return {k: np.asarray(v) for k, v in tfds.as_numpy(dataset).items()}
