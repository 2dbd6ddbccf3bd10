"""The JAX speech front end against an independent float64 numpy reference:
mel filters written out from the HTK formulas, frames, log-mel values, a pure
tone in the right band, SpecAugment."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab.layers import spectrogram
from conftest import htk_mel_filterbank
from conftest import numpy_log_mel


def test_mel_scale_is_htk():
  # HTK's scale is built so that 1 kHz is 1,000 mel, and 700 Hz is 2595 log10(2).
  assert spectrogram.hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)
  assert spectrogram.hz_to_mel(700.0) == pytest.approx(2595.0 * math.log10(2.0), rel=1e-12)
  hz = np.array([0.0, 20.0, 440.0, 4000.0, 8000.0])
  np.testing.assert_allclose(spectrogram.mel_to_hz(spectrogram.hz_to_mel(hz)), hz,
                             rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("num_mels,fft_size", [(40, 512), (20, 512), (80, 1024)])
def test_filterbank_matches_the_htk_formulas(num_mels, fft_size):
  np.testing.assert_allclose(spectrogram.mel_filterbank(num_mels, fft_size, 16000),
                             htk_mel_filterbank(num_mels, fft_size, 16000), rtol=0, atol=1e-6)
  # A narrower band moves every edge: the formulas, not a fixed table.
  np.testing.assert_allclose(
      spectrogram.mel_filterbank(num_mels, fft_size, 16000, low_hz=300.0, high_hz=6000.0),
      htk_mel_filterbank(num_mels, fft_size, 16000, low_hz=300.0, high_hz=6000.0),
      rtol=0, atol=1e-6)


def test_log_mel_matches_numpy_reference():
  rng = np.random.default_rng(0)
  wave = rng.normal(size=16000) * 0.1
  got = np.asarray(jax.jit(spectrogram.log_mel_spectrogram)(wave[None]))[0]
  want = numpy_log_mel(wave)
  assert got.shape == (98, 40)                      # 1 + (16000 - 400) // 160 frames
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


def test_pure_tone_peaks_in_its_mel_band():
  t = np.arange(16000) / 16000.0
  tone = np.sin(2 * np.pi * 1000.0 * t)
  log_mel = np.asarray(spectrogram.log_mel_spectrogram(tone[None], num_mels=64))[0]
  # The band whose HTK centre is nearest 1 kHz (centres equally spaced in mel).
  centres = [700.0 * (10.0 ** (m / 2595.0) - 1.0) for m in np.linspace(
      2595.0 * math.log10(1 + 20 / 700), 2595.0 * math.log10(1 + 8000 / 700), 66)[1:-1]]
  band = int(np.argmin(np.abs(np.array(centres) - 1000.0)))
  assert np.all(np.argmax(log_mel, axis=-1) == band)


def test_silence_sits_at_the_floor_and_batches_are_independent():
  batch = np.zeros((3, 8000))
  batch[1] = np.random.default_rng(1).normal(size=8000)
  out = np.asarray(spectrogram.log_mel_spectrogram(batch))
  np.testing.assert_allclose(out[0], np.log(1e-6), rtol=1e-6)
  single = np.asarray(spectrogram.log_mel_spectrogram(batch[1:2]))
  np.testing.assert_allclose(out[1:2], single, rtol=1e-5, atol=1e-5)


def test_filterbank_shape_and_errors():
  filters = spectrogram.mel_filterbank(40, 512, 16000)
  assert filters.shape == (257, 40) and filters.max() <= 1.0 and np.all(filters.sum(0) > 0)
  with pytest.raises(ValueError, match="too many"):
    spectrogram.mel_filterbank(200, 64, 16000)
  with pytest.raises(ValueError, match="high_hz"):
    spectrogram.mel_filterbank(40, 512, 16000, high_hz=9000)
  with pytest.raises(ValueError, match="fewer than one window"):
    spectrogram.log_mel_spectrogram(np.zeros((1, 100)))


def test_spec_augment_masks_bands_with_the_mean_and_is_seeded():
  log_mel = jnp.asarray(np.random.default_rng(2).normal(size=(4, 98, 40)), jnp.float32)
  key = jax.random.key(0)
  out = np.asarray(spectrogram.spec_augment(key, log_mel, time_width=10, freq_width=5))
  again = np.asarray(spectrogram.spec_augment(key, log_mel, time_width=10, freq_width=5))
  np.testing.assert_array_equal(out, again)
  changed = out != np.asarray(log_mel)
  assert changed.any()
  for b in range(4):
    mean = float(np.asarray(log_mel[b]).mean())
    np.testing.assert_allclose(out[b][changed[b]], mean, rtol=1e-6)
    # masked cells form whole time rows or whole mel columns
    rows = changed[b].all(axis=1)
    cols = changed[b].all(axis=0)
    assert np.array_equal(changed[b], rows[:, None] | cols[None, :])
    assert rows.sum() <= 2 * 10 and cols.sum() <= 2 * 5
