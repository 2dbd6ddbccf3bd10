"""Spoken words synthesised offline with eSpeak NG (groundwork for the speech task).

The ``espeakng-loader`` package ships the eSpeak NG library and its voice
data; this module drives the library's C API through ``ctypes`` in
synchronous mode (audio arrives through a callback, no sound device) and
returns one-second clips at 16 kHz, the format of Speech Commands.

Voice variants (``en+m3``, ``en+f2``, ``en+croak``...), speaking rate, pitch and
amplitude vary the speaker.

Reproducibility: eSpeak NG's samples are not bit-reproducible (measured:
the same word with the same settings differs from call to call and from
process to process, even after re-initialising the library and re-seeding
its noise), while the spectrogram is stable (tested: two renders of a word
are far closer than two different words). A dataset built from it is
therefore fixed once rendered and prepared to disk, not re-rendered
bit-identically from a seed.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from typing import List

import numpy as np

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE            # one second

# eSpeak NG's C API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH = 1, 2, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class ESpeak:
  """One initialised eSpeak NG library; ``say`` renders a word to int16 audio.

  The library keeps global state, so calls are serialised with a lock and
  the object is created once per process (``engine()``).
  """

  def __init__(self):
    import espeakng_loader  # imported late: only preparing speech data needs it
    self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
    self._lib.espeak_Initialize.restype = ctypes.c_int
    self.sample_rate = self._lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if self.sample_rate <= 0:
      raise RuntimeError(f"eSpeak NG failed to initialise (returned {self.sample_rate})")
    self._chunks: List[np.ndarray] = []
    self._callback = _CALLBACK(self._collect)    # kept alive: C holds the pointer
    self._lib.espeak_SetSynthCallback(self._callback)
    self._lock = threading.Lock()

  def _collect(self, wav, count, events):
    del events
    if count > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
    return 0

  def say(self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50,
          amplitude: int = 100) -> np.ndarray:
    """int16 samples at ``self.sample_rate`` of ``text`` spoken by ``voice``.

    Args:
      voice: an eSpeak voice name with an optional variant, ``en+m3``.
      rate: words per minute (80 to 450).
      pitch, amplitude: 0 to 100, and 0 to 200.

    Raises:
      ValueError: an unknown voice, or parameters out of range.
    """
    if not (80 <= rate <= 450 and 0 <= pitch <= 100 and 0 <= amplitude <= 200):
      raise ValueError(f"eSpeak: rate {rate} (80..450), pitch {pitch} (0..100) or "
                       f"amplitude {amplitude} (0..200) out of range")
    with self._lock:
      if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"eSpeak: unknown voice {voice!r}")
      for parameter, value in ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch),
                               (_ESPEAK_VOLUME, amplitude)):
        self._lib.espeak_SetParameter(parameter, value, 0)
      self._chunks = []
      data = text.encode("utf-8")
      status = self._lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, 0, 0, 0,
                                      None, None)
      if status != 0:
        raise RuntimeError(f"eSpeak: synthesis of {text!r} failed with status {status}")
      return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


_ENGINE = None


def engine() -> ESpeak:
  """The process's eSpeak NG instance (created on first use)."""
  global _ENGINE
  if _ENGINE is None:
    _ENGINE = ESpeak()
  return _ENGINE


@functools.lru_cache(maxsize=8)
def _lowpass(up: int, down: int) -> np.ndarray:
  """scipy's default anti-aliasing filter of ``resample_poly``; designing it
  takes ~20 ms, filtering a word ~0.1 ms, so it is made once per rate pair."""
  from scipy import signal
  rate = max(up, down)
  return signal.firwin(2 * 10 * rate + 1, 1.0 / rate, window=("kaiser", 5.0))


def resample(audio: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Band-limited resampling (polyphase filter) to ``to_rate``, float32."""
  from scipy import signal
  g = math.gcd(from_rate, to_rate)
  up, down = to_rate // g, from_rate // g
  return signal.resample_poly(np.asarray(audio, np.float64), up, down,
                              window=_lowpass(up, down)).astype(np.float32)


def fit_to_clip(audio: np.ndarray, offset: int = 0, samples: int = CLIP_SAMPLES) -> np.ndarray:
  """Places ``audio`` in a clip of ``samples``: centred, shifted by ``offset``
  samples (cut at the edges), zeros elsewhere."""
  clip = np.zeros(samples, np.float32)
  start = (samples - len(audio)) // 2 + offset
  lo, hi = max(start, 0), min(start + len(audio), samples)
  if hi > lo:
    clip[lo:hi] = audio[lo - start:hi - start]
  return clip


def spoken_word(word: str, voice: str = "en", rate: int = 175, pitch: int = 50,
                amplitude: int = 100, offset: int = 0) -> np.ndarray:
  """``word`` as a one-second float32 clip at 16 kHz in [-1, 1]."""
  tts = engine()
  audio = tts.say(word, voice, rate, pitch, amplitude).astype(np.float32) / 32768.0
  return fit_to_clip(resample(audio, tts.sample_rate), offset)
