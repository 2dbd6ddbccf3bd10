"""Offline speech synthesis with eSpeak NG: the ten command words render as
one-second 16 kHz clips, repeated renders sound the same (their samples
differ: eSpeak is not bit-reproducible), and voices, rates and pitches
change the audio."""

import numpy as np
import pytest

from attention_lab.data import speech_synth
from attention_lab.layers import spectrogram

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def test_every_command_word_renders_as_a_one_second_clip():
  for word in WORDS:
    clip = speech_synth.spoken_word(word, voice="en+m3")
    assert clip.shape == (16000,) and clip.dtype == np.float32
    assert 0.05 < np.abs(clip).max() <= 1.0, word
    assert np.mean(np.abs(clip) > 0.01) > 0.1, word     # speech fills a good part of it


def _log_mel(clip):
  return np.asarray(spectrogram.log_mel_spectrogram(clip[None]))[0]


def test_repeated_renders_sound_the_same():
  """Samples vary between renders (see the module); the spectrogram does not,
  beyond a small fraction of the difference between two words."""
  first = _log_mel(speech_synth.spoken_word("stop", voice="en+f2", rate=160, pitch=40))
  again = _log_mel(speech_synth.spoken_word("stop", voice="en+f2", rate=160, pitch=40))
  other = _log_mel(speech_synth.spoken_word("go", voice="en+f2", rate=160, pitch=40))
  assert np.abs(first - again).mean() < 0.1 * np.abs(first - other).mean()   # 0.06 vs 1.9 measured


def test_voice_rate_and_pitch_change_the_audio():
  base = _log_mel(speech_synth.spoken_word("stop", voice="en+f2", rate=160, pitch=40))
  same = _log_mel(speech_synth.spoken_word("stop", voice="en+f2", rate=160, pitch=40))
  for other in (dict(voice="en+m1", rate=160, pitch=40), dict(voice="en+f2", rate=260, pitch=40),
                dict(voice="en+f2", rate=160, pitch=80)):
    changed = _log_mel(speech_synth.spoken_word("stop", **other))
    assert np.abs(changed - base).mean() > 5 * np.abs(same - base).mean(), other


def test_words_differ_in_their_spectrograms():
  mels = {w: np.asarray(spectrogram.log_mel_spectrogram(speech_synth.spoken_word(w)[None]))[0]
          for w in ("yes", "no")}
  assert mels["yes"].shape == (98, 40)
  assert np.abs(mels["yes"] - mels["no"]).mean() > 0.5


def test_resample_keeps_a_tone_and_fit_to_clip_shifts():
  t = np.arange(22050) / 22050.0
  tone = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
  out = speech_synth.resample(tone, 22050)
  assert out.shape == (16000,)
  spectrum = np.abs(np.fft.rfft(out))
  assert abs(np.argmax(spectrum) - 440) <= 1           # 1 Hz bins over one second
  clip = speech_synth.fit_to_clip(np.ones(100, np.float32), offset=-7950, samples=1000)
  assert clip[:1].sum() == 0 or clip.sum() < 100       # cut at the left edge
  centred = speech_synth.fit_to_clip(np.ones(100, np.float32), samples=1000)
  assert np.flatnonzero(centred).tolist() == list(range(450, 550))


def test_bad_voice_and_parameters_are_named():
  with pytest.raises(ValueError, match="unknown voice"):
    speech_synth.engine().say("yes", voice="no-such-voice")
  with pytest.raises(ValueError, match="rate"):
    speech_synth.engine().say("yes", rate=5)
