"""The JAX speech front end against a loop-written numpy reference: frames,
mel filters, log-mel values, a pure tone in the right band, SpecAugment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab.layers import spectrogram


def _numpy_log_mel(wave, sample_rate=16000, window=400, hop=160, fft=512, mels=40):
  """Frame by frame with numpy's FFT and the filterbank built from its formula."""
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
  filters = spectrogram.mel_filterbank(mels, fft, sample_rate).astype(np.float64)
  rows = []
  for start in range(0, len(wave) - window + 1, hop):
    power = np.abs(np.fft.rfft(wave[start:start + window] * hann, n=fft)) ** 2
    rows.append(np.log(np.maximum(power @ filters, 1e-6)))
  return np.stack(rows)


def test_log_mel_matches_numpy_reference():
  rng = np.random.default_rng(0)
  wave = rng.normal(size=16000) * 0.1
  got = np.asarray(jax.jit(spectrogram.log_mel_spectrogram)(wave[None]))[0]
  want = _numpy_log_mel(wave)
  assert got.shape == (98, 40)                      # 1 + (16000 - 400) // 160 frames
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


def test_pure_tone_peaks_in_its_mel_band():
  t = np.arange(16000) / 16000.0
  tone = np.sin(2 * np.pi * 1000.0 * t)
  log_mel = np.asarray(spectrogram.log_mel_spectrogram(tone[None], num_mels=64))[0]
  filters = spectrogram.mel_filterbank(64, 512, 16000)
  band = int(np.argmax(filters[int(round(1000.0 / 16000 * 512))]))
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
