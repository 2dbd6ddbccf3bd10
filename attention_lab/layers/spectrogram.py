"""Speech front end in JAX: log-mel spectrograms and SpecAugment masking.

Pure functions, jit-able and batched, so the front end runs on the
accelerator inside the model rather than in the input pipeline.

Shapes: ``waveform [batch..., samples]`` -> ``log_mel [batch..., frames, mels]``
with ``frames = 1 + (samples - window) // hop`` (no padding: every frame is
real audio).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def hz_to_mel(hz):
  """HTK mel scale: ``2595 log10(1 + hz / 700)``."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def _mel_edges(num_mels: int, low_hz: float, high_hz: float) -> np.ndarray:
  """``num_mels + 2`` band edges in Hz, equally spaced on the mel scale."""
  return mel_to_hz(np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), num_mels + 2))


def _triangles(freq, edges, xp):
  """Filter weights at frequencies ``freq [..., bins, 1]`` -> ``[..., bins, mels]``:
  filter ``k`` rises from ``edges[k]`` to 1 at ``edges[k + 1]`` and falls to
  ``edges[k + 2]``. ``xp`` is numpy or jax.numpy (traced warps)."""
  left, centre, right = edges[:-2], edges[1:-1], edges[2:]
  rising = (freq - left) / (centre - left)
  falling = (right - freq) / (right - centre)
  return xp.maximum(0.0, xp.minimum(rising, falling))


def mel_filterbank(num_mels: int, fft_size: int, sample_rate: int,
                   low_hz: float = 20.0, high_hz: float = None) -> np.ndarray:
  """Triangular filters, equally spaced on the mel scale: ``[fft_size // 2 + 1, num_mels]``.

  Each filter rises from its left neighbour's centre to its own and falls to
  its right neighbour's, with peak 1 (HTK-style, unnormalised).

  Raises:
    ValueError: a band edge outside ``(0, sample_rate / 2]`` or too many mels
      for the FFT's resolution (a filter with no frequency bin).
  """
  nyquist = sample_rate / 2.0
  high_hz = nyquist if high_hz is None else high_hz
  if not 0.0 <= low_hz < high_hz <= nyquist:
    raise ValueError(f"mel_filterbank: need 0 <= low_hz < high_hz <= {nyquist} Hz, "
                     f"got {low_hz} and {high_hz}")
  bins = np.linspace(0.0, nyquist, fft_size // 2 + 1)
  filters = _triangles(bins[:, None], _mel_edges(num_mels, low_hz, high_hz), np)
  empty = np.flatnonzero(filters.sum(0) == 0)
  if len(empty):
    raise ValueError(f"mel_filterbank: {num_mels} mels are too many for fft_size "
                     f"{fft_size}: filter(s) {empty.tolist()} cover no frequency bin")
  return filters.astype(np.float32)


def warped_mel_filterbank(warp, num_mels: int, fft_size: int, sample_rate: int,
                          low_hz: float = 20.0):
  """``mel_filterbank`` read at warped frequencies, one warp per example.

  Filter ``k`` is evaluated at ``f * warp``, so it reads the energy at its
  centre divided by ``warp``: a warp above 1 moves every formant up by that
  factor, as a shorter vocal tract would, below 1 down (vocal tract length
  perturbation, Jaitly and Hinton 2013). Filters above ``nyquist * warp``
  (warp below 1) read nothing.

  Args:
    warp: float ``[batch]`` factors near 1.

  Returns:
    float32 ``[batch, fft_size // 2 + 1, num_mels]``; ``warp = 1`` gives
    ``mel_filterbank`` (float32 rounding).
  """
  mel_filterbank(num_mels, fft_size, sample_rate, low_hz)      # validates the layout
  nyquist = sample_rate / 2.0
  bins = np.linspace(0.0, nyquist, fft_size // 2 + 1).astype(np.float32)
  freq = jnp.asarray(warp, jnp.float32)[:, None, None] * bins[:, None]
  return _triangles(freq, _mel_edges(num_mels, low_hz, nyquist).astype(np.float32), jnp)


def frame(waveform, window: int, hop: int):
  """``[..., samples]`` -> ``[..., frames, window]`` overlapping frames."""
  samples = waveform.shape[-1]
  if samples < window:
    raise ValueError(f"frame: {samples} samples are fewer than one window of {window}")
  frames = 1 + (samples - window) // hop
  index = hop * np.arange(frames)[:, None] + np.arange(window)[None, :]
  return waveform[..., index]


def log_mel_spectrogram(waveform, *, sample_rate: int = 16000, window_ms: float = 25.0,
                        hop_ms: float = 10.0, num_mels: int = 40, fft_size: int = None,
                        floor: float = 1e-6, warp=None):
  """Log mel power spectrogram.

  Args:
    waveform: float ``[batch..., samples]``.
    window_ms, hop_ms: Hann window length and hop (25 ms and 10 ms: 400 and
      160 samples at 16 kHz).
    num_mels: mel bands (40 to 80 is usual for keyword spotting).
    fft_size: FFT length, at least the window (default: the next power of two).
    floor: power floor before the log, so silence gives ``log(floor)``, not -inf.
    warp: optional float ``[batch]`` frequency warps (``warped_mel_filterbank``)
      for a waveform ``[batch, samples]``; None reads the spectrum unwarped.

  Returns:
    float32 ``[batch..., frames, num_mels]``.
  """
  window = int(round(sample_rate * window_ms / 1000.0))
  hop = int(round(sample_rate * hop_ms / 1000.0))
  fft_size = fft_size or 1 << (window - 1).bit_length()
  if fft_size < window:
    raise ValueError(f"log_mel_spectrogram: fft_size {fft_size} < window {window}")
  frames = frame(jnp.asarray(waveform, jnp.float32), window, hop)
  hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window) / window)   # periodic
  spectrum = jnp.fft.rfft(frames * hann.astype(np.float32), n=fft_size)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  if warp is None:
    mel = power @ mel_filterbank(num_mels, fft_size, sample_rate)
  else:
    filters = warped_mel_filterbank(warp, num_mels, fft_size, sample_rate)
    mel = jnp.einsum("btf,bfm->btm", power, filters)
  return jnp.log(jnp.maximum(mel, floor))


def spec_augment(rng, log_mel, *, time_masks: int = 2, time_width: int = 10,
                 freq_masks: int = 2, freq_width: int = 5):
  """SpecAugment (Park et al. 2019) without time warping: zero-mean bands.

  Masks ``time_masks`` spans of up to ``time_width`` frames and
  ``freq_masks`` spans of up to ``freq_width`` mel bands, drawn per example
  from ``rng``; masked cells get the example's mean (a neutral value for a
  log spectrogram, where 0 would be loud).

  Args:
    log_mel: ``[batch, frames, mels]``.

  Returns:
    the masked spectrogram, same shape and dtype.
  """
  batch, frames, mels = log_mel.shape
  keys = jax.random.split(rng, 4)

  def spans(key_start, key_width, count, width, size):
    widths = jax.random.randint(key_width, (batch, count), 0, width + 1)
    starts = jax.random.randint(key_start, (batch, count), 0, jnp.maximum(size - widths, 1))
    position = jnp.arange(size)
    inside = ((position[None, None, :] >= starts[..., None]) &
              (position[None, None, :] < (starts + widths)[..., None]))
    return inside.any(axis=1)                                   # [batch, size]

  masked_time = spans(keys[0], keys[1], time_masks, time_width, frames)
  masked_freq = spans(keys[2], keys[3], freq_masks, freq_width, mels)
  mask = masked_time[:, :, None] | masked_freq[:, None, :]
  mean = log_mel.mean(axis=(1, 2), keepdims=True)
  return jnp.where(mask, mean, log_mel)


class LogMelSettings(nn.Module, kw_only=True):
  """The front end's six settings, declared once: ``LogMelFrontEnd`` and each
  speech model that builds one inherit them, so a config's ``model.num_mels``
  (and the others) reaches the front end under the same name everywhere.

  Keyword-only, so they can follow a model's required fields (``num_classes``).

  Attributes:
    num_mels: mel bands.
    max_warp: in training, each example's frequency axis is warped by a
      factor drawn from ``[1 - max_warp, 1 + max_warp]`` (0: off), which
      imitates other vocal tracts.
    time_masks, time_width, freq_masks, freq_width: SpecAugment in training
      (``time_masks = freq_masks = 0`` turns it off).
  """
  num_mels: int = 40
  max_warp: float = 0.0
  time_masks: int = 2
  time_width: int = 10
  freq_masks: int = 2
  freq_width: int = 5

  def front_end_settings(self) -> Dict[str, Any]:
    """``{field: value}`` of the six settings, to build a ``LogMelFrontEnd``."""
    return {field: getattr(self, field) for field in FRONT_END_FIELDS}


FRONT_END_FIELDS = tuple(f.name for f in dataclasses.fields(LogMelSettings)
                         if f.name not in ("parent", "name"))


class LogMelFrontEnd(LogMelSettings):
  """Raw clips -> normalised log-mel frames, with SpecAugment in training.

  The spectrogram (before normalisation) is sown as ``spectrogram`` for
  pictures. Each example is scaled to zero mean and unit variance over its
  whole spectrogram: this removes the recording's gain but keeps the
  loudness contour over time and the spectral shape, which separate speech
  from noise.

  Attributes (besides the keyword-only ``LogMelSettings``):
    sample_rate: of the clips.
    dtype: dtype of the frames it returns (None: float32). The front end
      itself always computes in float32: it is numerically sensitive (power
      spectra span many orders of magnitude before the log, and bfloat16's
      8-bit mantissa in the FFT's and mel filters' sums would blur the quiet
      bands), and it is a small part of the model's work.

  Training draws both from the ``dropout`` rng stream.
  """
  sample_rate: int = 16000
  dtype: Any = None

  @nn.compact
  def __call__(self, audio, *, train: bool = False):
    """audio int16 (full scale 32768) or float ``[batch, samples]`` ->
    ``[batch, frames, num_mels]`` in ``dtype`` (float32 by default); the sown
    spectrogram is float32."""
    if audio.ndim != 2:
      raise ValueError(f"LogMelFrontEnd expects clips [batch, samples], got {tuple(audio.shape)}")
    waveform = audio.astype(jnp.float32)
    if jnp.issubdtype(audio.dtype, jnp.integer):
      waveform = waveform / 32768.0
    warp = None
    if train and self.max_warp > 0:
      warp = jax.random.uniform(self.make_rng("dropout"), (audio.shape[0],),
                                minval=1.0 - self.max_warp, maxval=1.0 + self.max_warp)
    log_mel = log_mel_spectrogram(waveform, sample_rate=self.sample_rate,
                                  num_mels=self.num_mels, warp=warp)
    self.sow("intermediates", "spectrogram", log_mel)
    mean = log_mel.mean(axis=(1, 2), keepdims=True)
    std = log_mel.std(axis=(1, 2), keepdims=True)
    x = (log_mel - mean) / jnp.maximum(std, 1e-3)
    if train and (self.time_masks or self.freq_masks):
      x = spec_augment(self.make_rng("dropout"), x, time_masks=self.time_masks,
                       time_width=self.time_width, freq_masks=self.freq_masks,
                       freq_width=self.freq_width)
    return x.astype(self.dtype or jnp.float32)
