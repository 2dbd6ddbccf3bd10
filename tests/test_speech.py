"""Speech: the synthesised dataset's recipe and builder, the front-end module,
KWT and Conformer, the speech pictures, and the experiments end to end
(offline on the smoke set; ``speech_commands_kwt`` through TFDS's own
``speech_commands`` builder fed local WAV archives)."""

import io
import os
import tarfile
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from attention_lab import data
from attention_lab import models
from attention_lab import train
from attention_lab.data import audio
from attention_lab.data import sources
from attention_lab.data import synthetic_speech_commands as sc
from attention_lab.layers import AttentionConfig
from attention_lab.layers import conformer
from attention_lab.layers.spectrogram import LogMelFrontEnd
from attention_lab.viz import speech as speech_viz
from attention_lab.viz import sown as sown_lib
from conftest import assert_picture
from conftest import htk_mel_filterbank
from conftest import numpy_log_mel
from conftest import override
from conftest import prepare_stand_in
from conftest import train_stop_and_resume

TINY_RUN = {"total_steps": 4, "batch_size": 8, "eval_batch_size": 32, "log_every": 2,
            "eval_every": 2, "checkpoint_every": 2, "optimizer.warmup_steps": 1,
            "viz.num_examples": 2}
SMALL = {
    "speech_kwt": {"model.hidden_dim": 16, "model.num_layers": 2, "model.num_heads": 2,
                   "model.mlp_dim": 16, "model.num_mels": 20},
    "speech_conformer": {"model.hidden_dim": 16, "model.num_layers": 2, "model.num_heads": 2,
                         "model.mlp_dim": 32, "model.subsample_channels": 4,
                         "model.attention_units": 8, "model.num_mels": 20},
}


# ----------------------------------------------------------------------------- recipe

def test_voice_variants_are_dealt_to_disjoint_splits():
  splits = sc.split_variants(7)
  assert set(splits) == set(sc.SPLITS)
  seen = [set(v) for v in splits.values()]
  assert sum(map(len, seen)) == len(sc.VARIANTS) == len(set().union(*seen))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert len(splits["test"]) >= 15                 # enough unheard voices to mean something
  assert sc.split_variants(7) == splits and sc.split_variants(8) != splits


def test_plans_are_balanced_seeded_and_use_only_their_split_voices():
  plans = sc.split_plans(3, "test", 120)
  labels = [p["label"] for p in plans]
  assert all(labels.count(name) == 10 for name in sc.LABELS)
  assert plans == sc.split_plans(3, "test", 120)
  assert plans != sc.split_plans(4, "test", 120)
  test_variants = set(sc.split_variants(3)["test"])
  for p in plans:
    if p["label"] == sc.SILENCE:
      assert p["word"] == "" and p["speaker"] == ""
      continue
    accent, variant = p["speaker"].split("+", 1)
    assert accent in sc.ACCENTS and variant in test_variants
    assert p["word"] == p["label"] if p["label"] in sc.WORDS else p["word"] in sc.UNKNOWN_WORDS
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    sc.split_plans(3, "dev", 12)


@pytest.mark.parametrize("kind", sc.NOISES)
def test_noise_has_unit_rms_and_its_spectral_shape(kind):
  x = sc.noise(kind, sc.CLIP_SAMPLES, np.random.default_rng(0))
  assert x.dtype == np.float32 and x.shape == (sc.CLIP_SAMPLES,)
  np.testing.assert_allclose(np.sqrt(np.mean(x.astype(np.float64) ** 2)), 1.0, rtol=1e-4)
  power = np.abs(np.fft.rfft(x)) ** 2
  freqs = np.fft.rfftfreq(len(x), 1 / sc.SAMPLE_RATE)
  low = power[(freqs > 200) & (freqs < 400)].mean()
  high = power[(freqs > 3200) & (freqs < 6400)].mean()
  # One octave each, 16 times higher: white stays flat, pink falls 16x (1/f),
  # brown 256x (1/f^2).
  expected = {"white": 1.0, "pink": 16.0, "brown": 256.0}.get(kind)
  if expected is None:                              # hum: mains harmonics dominate
    assert power[(freqs >= 49) & (freqs <= 61)].sum() > 0.2 * power.sum()
  else:
    assert expected / 2 < low / high < expected * 2
  with pytest.raises(ValueError, match="unknown noise 'rain'"):
    sc.noise("rain", 100, np.random.default_rng(0))


def test_silence_is_noise_at_its_planned_level_and_words_are_louder_than_their_noise():
  rng = np.random.default_rng(1)
  silence = sc.example_plan(sc.SILENCE, ("m3",), rng)
  clip = sc.render(silence).astype(np.float64) / 32767
  np.testing.assert_allclose(20 * np.log10(np.sqrt(np.mean(clip ** 2))),
                             silence["level_dbfs"], atol=0.2)
  word = dict(sc.example_plan("yes", ("m3",), rng), snr_db=30.0, shift=0)
  clip = sc.render(word).astype(np.float64)
  middle, edge = clip[6000:10000], clip[:1500]       # the word is centred; edges hold noise
  assert np.mean(middle ** 2) > 30 * np.mean(edge ** 2)
  assert sc.render(word).dtype == np.int16 and len(clip) == sc.CLIP_SAMPLES


# ----------------------------------------------------------------------------- builder

@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("speech_tfds"))
  sources.load_split("speech_commands_offline/smoke", "test[:1]", path)
  return path


def test_offline_builder_matches_tfds_speech_commands_features(speech_dir):
  from tensorflow_datasets.datasets.speech_commands import speech_commands_dataset_builder as tfds_sc
  splits = {s: sources.load_split("speech_commands_offline/smoke", s, speech_dir)
            for s in ("train", "validation", "test")}
  assert {s: len(v["label"]) for s, v in splits.items()} == {
      "train": 240, "validation": 60, "test": 60}
  assert list(sc.LABELS) == tfds_sc.WORDS + [tfds_sc.SILENCE, tfds_sc.UNKNOWN]
  for split in splits.values():
    assert split["audio"].dtype == np.int16 and split["audio"].shape[1] == 16000
    assert np.bincount(split["label"], minlength=12).min() == len(split["label"]) // 12
  speakers = {s: {x.decode().split("+", 1)[1] for x in v["speaker"] if x}
              for s, v in splits.items()}
  assert not speakers["train"] & speakers["test"]
  assert not speakers["train"] & speakers["validation"]
  silence = splits["test"]["label"] == sc.LABELS.index(sc.SILENCE)
  assert all(x == b"" for x in splits["test"]["speaker"][silence])


def test_speech_pipeline_shapes_and_time_shift(speech_dir):
  config = _tiny("speech_kwt", speech_dir)
  bundle = data.build(config)
  batch = bundle.train(0)
  assert batch["inputs"].shape == (8, 16000) and batch["inputs"].dtype == np.int16
  assert bundle.class_names == sc.LABELS and bundle.num_classes == 12
  clips = np.arange(1, 11, dtype=np.int16)[None].repeat(3, 0)
  shifted = audio.random_time_shift(3)({"inputs": clips}, np.random.default_rng(0))["inputs"]
  for row in shifted:                                # a shifted copy with silence let in
    nonzero = row[row != 0]
    assert len(nonzero) >= 7 and np.all(np.diff(nonzero) == 1)
  with pytest.raises(ValueError, match=r"audio \[n, 16000\]"):
    audio.speech_inputs({"audio": np.zeros((2, 8000), np.int16), "label": np.zeros(2)})


# ----------------------------------------------------------------------------- models

def test_front_end_normalises_and_masks_only_in_training():
  clips = (np.random.default_rng(0).standard_normal((2, 16000)) * 3000).astype(np.int16)
  front = LogMelFrontEnd(num_mels=32)
  variables = front.init(jax.random.key(0), clips)
  x, state = front.apply(variables, clips, mutable=["intermediates"])
  assert x.shape == (2, 98, 32)
  np.testing.assert_allclose(x.mean(axis=(1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(x.std(axis=(1, 2)), 1.0, atol=1e-3)
  assert state["intermediates"]["spectrogram"][0].shape == (2, 98, 32)
  louder = front.apply(variables, (clips.astype(np.float32) * 4 / 32768))
  np.testing.assert_allclose(louder, x, atol=1e-3)   # gain removed; ints are full scale 32768
  a = front.apply(variables, clips, train=True, rngs={"dropout": jax.random.key(1)})
  b = front.apply(variables, clips, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b) and np.isclose(a, 0.0, atol=1e-5).mean() > 0.05
  with pytest.raises(ValueError, match=r"clips \[batch, samples\]"):
    front.apply(variables, clips[0])


def test_conformer_relative_bias_is_a_score_mod_of_each_block():
  """Each block's attention holds a ``[heads, 2D + 1]`` table applied as the
  ``relative_bias`` score_mod: the block equals the same block given the
  dense bias ``table[h, clip(j - i, -D, D) + D]`` written out in NumPy, and
  the classifier has one table per block and no dense ``[T, T]`` bias."""
  heads, distance, t, d = 2, 4, 10, 8
  attention = conformer.with_relative_bias(AttentionConfig(), distance)
  assert attention.score_mod == "relative_bias"
  assert conformer.with_relative_bias(AttentionConfig(score_mod="alibi"), distance).score_mod \
      == "alibi"                                  # a configured score_mod replaces it
  block = conformer.ConformerBlock(num_heads=heads, mlp_dim=16, conv_kernel_size=3,
                                   attention=attention)
  x = jax.random.normal(jax.random.key(0), (2, t, d))
  variables = block.init(jax.random.key(1), x)
  table = np.random.default_rng(0).standard_normal((heads, 2 * distance + 1)).astype(np.float32)
  assert variables["params"]["attention"]["relative_bias"].shape == table.shape
  variables["params"]["attention"]["relative_bias"] = jnp.asarray(table)
  got = block.apply(variables, x)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  dense = table[:, np.clip(j - i, -distance, distance) + distance][None]    # [1, heads, t, t]
  plain = conformer.ConformerBlock(num_heads=heads, mlp_dim=16, conv_kernel_size=3)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  del params["attention"]["relative_bias"]
  want = plain.apply({**variables, "params": params}, x, bias=dense)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(plain.apply({**variables, "params": params}, x), want, atol=1e-3)

  model = models.build({"name": "conformer", "num_classes": 3, "hidden_dim": 8,
                        "num_layers": 2, "num_heads": heads, "mlp_dim": 16, "num_mels": 20,
                        "subsample_channels": 4, "attention_units": 8, "max_distance": 6})
  params = model.init(jax.random.key(0), np.zeros((1, 16000), np.int16))["params"]
  assert "relative_bias" not in params
  assert [params[f"block{i}"]["attention"]["relative_bias"].shape for i in range(2)] \
      == [(heads, 13)] * 2


def test_conformer_block_has_the_papers_parts():
  d, ff, k, heads = 16, 64, 7, 2
  block = conformer.ConformerBlock(num_heads=heads, mlp_dim=ff, conv_kernel_size=k)
  x = jnp.ones((2, 11, d))
  variables = block.init(jax.random.key(0), x)
  count = sum(p.size for p in jax.tree_util.tree_leaves(variables["params"]))
  feed_forward = 2 * d + (d * ff + ff) + (ff * d + d)      # LayerNorm, expand, project
  attention = 2 * d + 4 * (d * d + d)                      # LayerNorm, q/k/v/out
  convolution = (2 * d + (d * 2 * d + 2 * d) + (k * d + d) + 2 * d + (d * d + d))
  assert count == 2 * feed_forward + attention + convolution + 2 * d   # + final LayerNorm
  assert variables["batch_stats"]["conv"]["BatchNorm_0"]["mean"].shape == (d,)
  y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
  assert y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y).mean(-1), 0.0, atol=1e-5)   # ends in LayerNorm


@pytest.mark.parametrize("name", ["kwt", "conformer"])
def test_speech_models_shapes_sown_maps_and_kernel_independence(name):
  clips = (np.random.default_rng(0).standard_normal((2, 16000)) * 2000).astype(np.int16)
  fields = dict(num_classes=12, hidden_dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                num_mels=20)
  if name == "conformer":
    fields.update(subsample_channels=4, attention_units=8)
  model = models.build({"name": name, **fields})
  variables = model.init(jax.random.key(0), clips)
  logits, state = model.apply(variables, clips, mutable=["intermediates"])
  assert logits.shape == (2, 12)
  sown = state["intermediates"]
  weights = sown_lib.collect_attention(sown)
  if name == "kwt":
    assert [w.shape for w in weights] == [(2, 2, 99, 99)] * 2        # 98 frames + CLS
  else:
    assert [w.shape for w in weights if w.ndim == 4] == [(2, 2, 23, 23)] * 2   # 98 -> 23
    assert [w.shape for w in weights if w.ndim == 3] == [(2, 1, 23)]
  reference = models.build({"name": name, **fields, "attention": {"kernel": "reference"}})
  np.testing.assert_allclose(reference.apply(variables, clips), logits, atol=2e-5)
  with pytest.raises(ValueError, match=r"audio clips \[batch, samples\]"):
    model.apply(variables, clips[0])


def test_spread_over_frames_and_speech_curves():
  spread = speech_viz.spread_over_frames(np.array([[0.0, 1.0, 0.0, 0.0]]), 16)
  assert spread.shape == (1, 16) and np.isclose(spread.sum(), 1.0)
  assert 4 <= spread.argmax() <= 7                 # the second quarter of the clip
  rng = np.random.default_rng(0)
  softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  cls_layers = [softmax(rng.standard_normal((1, 2, 11, 11))) for _ in range(2)]
  curves = speech_viz.speech_curves({"a": {"attention_weights": (cls_layers[0],)},
                                     "b": {"attention_weights": (cls_layers[1],)}}, 10)
  assert set(curves) == {"CLS, last layer", "CLS rollout"}
  assert all(c.shape == (1, 10) and np.isclose(c.sum(), 1.0) for c in curves.values())
  pooled = softmax(rng.standard_normal((1, 1, 5)))
  curves = speech_viz.speech_curves({"block0": {"attention_weights": (cls_layers[0][..., :5, :5],)},
                                     "pooling": {"attention_weights": (pooled,)}}, 20)
  assert set(curves) == {"attention pooling", "pooling through rollout"}


# ----------------------------------------------------------------------------- experiments

def _tiny(name, data_dir, **overrides):
  config = experiments.get_config(name)
  config.data.data_dir = data_dir
  overrides = {"data.name": "speech_commands_offline/smoke", **TINY_RUN,
               **SMALL.get(name, {}), **overrides}
  return override(config, **overrides)


# KWT is the token classifier the ViT tests train end to end; the speech front
# end and pictures run with the Conformer in the default suite.
@pytest.mark.parametrize("name", [pytest.param("speech_kwt", marks=pytest.mark.slow),
                                  "speech_conformer"])
def test_speech_experiments_train_resume_and_draw(tmp_path, speech_dir, name):
  config = _tiny(name, speech_dir, debug_nans=True)
  workdir = str(tmp_path)
  train_stop_and_resume(config, workdir)
  folder = os.path.join(workdir, "attention")
  spectrograms = sorted(f for f in os.listdir(folder) if f.endswith("_spectrogram.png"))
  heads = sorted(f for f in os.listdir(folder) if f.endswith("_heads.png"))
  assert len(spectrograms) == 2 and len(heads) == 2
  for f in spectrograms + heads:
    assert_picture(os.path.join(folder, f))
  index = open(os.path.join(folder, "index.html")).read()
  eval_labels = data.build(config).eval["label"][:2]
  assert f"label <b>{sc.LABELS[eval_labels[0]]}</b>" in index   # class names, not ids


# ------------------------------------------------- TFDS speech_commands from local archives

def _wav(samples: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(16000)
    f.writeframes(samples.astype("<i2").tobytes())
  return buffer.getvalue()


def _tar(path, files):
  with tarfile.open(path, "w:gz") as tar:
    for name, payload in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def _speech_commands_archives(folder):
  """The two archives of Speech Commands v0.02 in miniature: word folders of
  WAV clips (some shorter than a second, as in the real set), the test and
  validation lists, background noise; and the test archive with _silence_."""
  rng = np.random.default_rng(0)
  clip = lambda n: (rng.standard_normal(n) * 1000).astype(np.int16)
  train_files, test_list, validation_list = {}, [], []
  for w, word in enumerate(("yes", "no", "up", "bed", "happy")):
    for i in range(4):
      name = f"{word}/{w:04x}{i:04x}_nohash_0.wav"
      train_files[name] = _wav(clip(16000 if i % 2 else 12000))
      (test_list if i == 3 else validation_list if i == 2 else []).append(name)
  for noise in ("white_noise.wav", "running_tap.wav"):
    train_files[f"_background_noise_/{noise}"] = _wav(clip(40000))
  train_files["testing_list.txt"] = "\n".join(test_list).encode()
  train_files["validation_list.txt"] = "\n".join(validation_list).encode()
  test_files = {f"{word}/{i:08x}_nohash_0.wav": _wav(clip(14000 + 1000 * i))
                for i, word in enumerate(("yes", "no", "_silence_", "bed", "tree"))}
  paths = {"speech_commands_v0.02.tar.gz": os.path.join(folder, "train.tar.gz"),
           "speech_commands_test_set_v0.02.tar.gz": os.path.join(folder, "test.tar.gz")}
  _tar(paths["speech_commands_v0.02.tar.gz"], train_files)
  _tar(paths["speech_commands_test_set_v0.02.tar.gz"], test_files)
  return paths


class _LocalDownloads:
  """The builder's download manager with ``download`` answered from local files."""

  def __init__(self, manager, paths):
    self._manager, self._paths = manager, paths

  def download(self, urls):
    return [self._paths[os.path.basename(u)] for u in urls]

  def iter_archive(self, path):
    return self._manager.iter_archive(path)


@pytest.fixture(scope="module")
def speech_commands_dir(tmp_path_factory):
  import tensorflow_datasets as tfds
  path = str(tmp_path_factory.mktemp("speech_commands_tfds"))
  archives = _speech_commands_archives(str(tmp_path_factory.mktemp("archives")))
  builder_class = type(tfds.builder("speech_commands", data_dir=path))
  original = builder_class._split_generators     # TFDS's own split and example code runs
  return prepare_stand_in(
      "speech_commands", path,
      lambda self, manager: original(self, _LocalDownloads(manager, archives)))


def test_speech_commands_kwt_reads_tfds_speech_commands_with_short_clips(
    tmp_path, speech_commands_dir):
  config = _tiny("speech_commands_kwt", speech_commands_dir,
                 **{"data.name": "speech_commands", **SMALL["speech_kwt"],
                    "model.num_heads": 1, "batch_size": 4, "eval_batch_size": 4})
  bundle = data.build(config)
  # 5 words x 4 clips, one per word to validation and test; background noise cut
  # into half-overlapping seconds (white_noise) go to training as _silence_.
  assert bundle.train.arrays["inputs"].shape[1:] == (16000,)
  labels = [sc.LABELS[i] for i in bundle.eval["label"]]
  assert sorted(labels) == sorted(["yes", "no", "_silence_", "_unknown_", "_unknown_"])
  short = bundle.eval["inputs"][labels.index("yes")]        # 14,000 samples on disk
  assert np.all(short[14000:] == 0) and np.any(short[:14000] != 0)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 4 and 0.0 <= results["eval_accuracy"] <= 1.0


def test_fixed_lengths_names_a_missing_feature(speech_dir):
  with pytest.raises(ValueError, match=r"feature\(s\) \['waveform'\]"):
    sources.load_split("speech_commands_offline/smoke", "test", speech_dir,
                       fixed_lengths={"waveform": 16000})


def test_warped_filterbank_is_the_htk_filterbank_read_at_warped_frequencies():
  from attention_lab.layers import spectrogram
  warps = np.array([1.0, 1.2, 0.85])
  warped = np.asarray(spectrogram.warped_mel_filterbank(warps, 40, 512, 16000))
  for filters, w in zip(warped, warps):
    np.testing.assert_allclose(filters, htk_mel_filterbank(40, 512, 16000, warp=w), atol=1e-5)
  t = np.arange(16000) / 16000
  tone = np.sin(2 * np.pi * 1000 * t)[None].repeat(2, 0)
  bands = spectrogram.log_mel_spectrogram(tone, warp=np.array([1.0, 1.2])).mean(1).argmax(-1)
  # Warped by 1.2, the 1 kHz tone lands in the band of 1.2 kHz (a shorter vocal tract).
  plain_band = int(np.argmax(htk_mel_filterbank(40, 512, 16000)[int(round(1200 * 512 / 16000))]))
  assert bands[1] > bands[0] and abs(int(bands[1]) - plain_band) <= 1


def _normalised_log_mel(clip, num_mels, warp=1.0):
  """The front end's output written out: float64 log-mel of the int16 clip at
  full scale 32768, scaled to zero mean and unit variance over the clip."""
  log_mel = numpy_log_mel(clip / 32768.0, num_mels=num_mels, warp=warp)
  return (log_mel - log_mel.mean()) / log_mel.std()


def test_front_end_is_the_log_mel_in_evaluation_and_warps_per_example_in_training(
    monkeypatch):
  from attention_lab.layers import spectrogram
  front = LogMelFrontEnd(num_mels=20, max_warp=0.2, time_masks=0, freq_masks=0)
  clips = (np.random.default_rng(0).standard_normal((2, 4000)) * 3000).astype(np.int16)
  variables = front.init(jax.random.key(0), clips)
  want = np.stack([_normalised_log_mel(c, 20) for c in clips])
  evaluated = np.asarray(front.apply(variables, clips))
  assert evaluated.shape == (2, 23, 20)                     # 1 + (4000 - 400) // 160 frames
  np.testing.assert_allclose(evaluated, want, atol=1e-5)      # measured 1.1e-6
  # Evaluation draws nothing: an rng, if given, changes nothing.
  np.testing.assert_array_equal(
      front.apply(variables, clips, rngs={"dropout": jax.random.key(1)}), evaluated)

  # Training warps each example by its own factor from the dropout stream. The
  # factors are read where the front end passes them on, and the output is
  # checked against the written-out filterbank read at those frequencies.
  drawn = []
  log_mel = spectrogram.log_mel_spectrogram

  def recording(waveform, **kwargs):
    drawn.append(np.asarray(kwargs["warp"]))
    return log_mel(waveform, **kwargs)

  monkeypatch.setattr(spectrogram, "log_mel_spectrogram", recording)
  train = lambda seed: np.asarray(front.apply(
      variables, clips, train=True, rngs={"dropout": jax.random.key(seed)}))
  a, again, b = train(1), train(1), train(2)
  warps_a, warps_again, warps_b = drawn
  assert np.all((0.8 <= warps_a) & (warps_a <= 1.2)) and warps_a[0] != warps_a[1]
  np.testing.assert_array_equal(warps_again, warps_a)      # same key, same draw
  assert np.all(warps_b != warps_a)
  np.testing.assert_array_equal(again, a)
  for out, warps in ((a, warps_a), (b, warps_b)):
    for i in range(2):
      np.testing.assert_allclose(out[i], _normalised_log_mel(clips[i], 20, warps[i]), atol=1e-5)
  assert np.abs(a - evaluated).max() > 0.1 and np.abs(a - b).max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["speech_kwt", "speech_conformer"])
def test_speech_experiments_reach_target_on_unheard_voices(tmp_path, name):
  """>= 95% on the 2,400 test clips, data prepared afresh (times: docs/results.md)."""
  config = experiments.get_config(name)
  config.data.data_dir = str(tmp_path / "tfds")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval_accuracy"] >= 0.95
