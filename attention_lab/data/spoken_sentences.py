"""Short spoken sentences, synthesised offline: the recipe of ``spoken_sentences_offline``.

Sentences come from a small grammar of commands and digit strings
(``turn left three times``, ``call five one two``, ``go back four steps``,
``seven three nine one``) and are spoken by eSpeak NG (``speech_synth``) in
a two-second clip at 16 kHz with background noise, for character-level
speech recognition.

Speakers are an English accent with an eSpeak voice variant, dealt to the
splits exactly as in ``synthetic_speech_commands`` (``split_variants``):
validation and test are spoken by variants never heard in training. Each
example draws its sentence, speaker, rate, pitch, amplitude, noise and
signal-to-noise ratio from ``numpy.random.default_rng([seed, split, index])``.

Clip length: a sentence longer than the clip at its drawn rate is spoken
faster (the rate raised just enough, up to eSpeak's 450 words per minute),
never cut; one that still does not fit is an error naming it.

Reproducibility: as ``synthetic_speech_commands``, the recipe is fixed by the
seed, eSpeak's samples only up to small differences (``speech_synth``).
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

import numpy as np

from attention_lab.data import characters
from attention_lab.data import speech_synth
from attention_lab.data import synthetic_speech_commands as commands

SAMPLE_RATE = speech_synth.SAMPLE_RATE
CLIP_SECONDS = 2
CLIP_SAMPLES = CLIP_SECONDS * SAMPLE_RATE

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNTS = ("two", "three", "four", "five")
DIRECTIONS = ("left", "right")
MOVES = ("forward", "back", "up", "down")
DIGIT_STRING = (3, 5)      # digits in a bare digit string, inclusive
CALL_DIGITS = (3, 4)       # digits after "call", inclusive
FORMS = ("turn", "call", "go", "digits")

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARS = SPECIAL_TOKENS + tuple(" abcdefghijklmnopqrstuvwxyz")
CHAR_IDS = {c: i for i, c in enumerate(CHARS)}
PAD_ID, BOS_ID, EOS_ID = characters.PAD_ID, characters.BOS_ID, characters.EOS_ID

SPLITS = commands.SPLITS
RATE_WPM = (130, 230)
PITCH = commands.PITCH
AMPLITUDE = commands.AMPLITUDE
SNR_DB = (10.0, 35.0)
NOISES = commands.NOISES
MAX_RATE = 450             # eSpeak's fastest


def _digits(rng: np.random.Generator, bounds: Tuple[int, int]) -> List[str]:
  return [DIGITS[i] for i in rng.integers(len(DIGITS), size=rng.integers(bounds[0],
                                                                          bounds[1] + 1))]


def sentence(rng: np.random.Generator) -> str:
  """One sentence of the grammar (forms equally likely)."""
  form = FORMS[rng.integers(len(FORMS))]
  if form == "turn":
    return f"turn {DIRECTIONS[rng.integers(2)]} {COUNTS[rng.integers(len(COUNTS))]} times"
  if form == "call":
    return " ".join(["call"] + _digits(rng, CALL_DIGITS))
  if form == "go":
    return f"go {MOVES[rng.integers(len(MOVES))]} {COUNTS[rng.integers(len(COUNTS))]} steps"
  return " ".join(_digits(rng, DIGIT_STRING))


# The longest sentence + <eos>: five digits of five letters ("seven", "three",
# "eight") and four spaces = 29 characters; a test checks it against the grammar.
TARGET_LENGTH = 5 * 5 + 4 + 1


def encode(texts) -> np.ndarray:
  """Transcripts -> character ids ``int32 [n, TARGET_LENGTH]`` ending in ``<eos>``."""
  return characters.encode(texts, TARGET_LENGTH, CHAR_IDS, add_eos=True)


def example_plan(variants, rng: np.random.Generator) -> dict:
  """The random choices of one example (everything but eSpeak's samples)."""
  accent = commands.ACCENTS[rng.integers(len(commands.ACCENTS))]
  return {"text": sentence(rng),
          "speaker": f"{accent}+{variants[rng.integers(len(variants))]}",
          "rate": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
          "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1)),
          "amplitude": int(rng.integers(AMPLITUDE[0], AMPLITUDE[1] + 1)),
          "noise": NOISES[rng.integers(len(NOISES))],
          "snr_db": float(rng.uniform(*SNR_DB)),
          "start": float(rng.uniform()),       # where the speech sits in the clip's slack
          "noise_seed": int(rng.integers(2 ** 31))}


def speak(text: str, speaker: str, rate: int, pitch: int, amplitude: int) -> Tuple[np.ndarray, int]:
  """``text`` as float32 at 16 kHz, sped up until it fits ``CLIP_SAMPLES``;
  returns the audio and the rate used.

  Raises:
    ValueError: a sentence too long for the clip even at ``MAX_RATE``.
  """
  tts = speech_synth.engine()
  while True:
    audio = tts.say(text, speaker, rate, pitch, amplitude).astype(np.float32) / 32768.0
    audio = speech_synth.resample(audio, tts.sample_rate)
    if len(audio) <= CLIP_SAMPLES:
      return audio, rate
    if rate >= MAX_RATE:
      raise ValueError(f"sentence {text!r} by {speaker} lasts {len(audio) / SAMPLE_RATE:.2f} s "
                       f"at {rate} words per minute, longer than the {CLIP_SECONDS} s clip")
    # Duration is about inversely proportional to the rate; 5% spare.
    rate = min(MAX_RATE, int(np.ceil(rate * len(audio) / CLIP_SAMPLES * 1.05)))


def render(plan: dict) -> Tuple[np.ndarray, int]:
  """One example's clip, int16 ``[CLIP_SAMPLES]``, and the rate spoken at."""
  speech, rate = speak(plan["text"], plan["speaker"], plan["rate"], plan["pitch"],
                       plan["amplitude"])
  start = int(plan["start"] * (CLIP_SAMPLES - len(speech)))
  clip = np.zeros(CLIP_SAMPLES, np.float32)
  clip[start:start + len(speech)] = speech
  background = commands.noise(plan["noise"], CLIP_SAMPLES,
                              np.random.default_rng(plan["noise_seed"]))
  voiced = np.abs(speech) > 1e-4
  power = float(np.mean(speech[voiced] ** 2)) if voiced.any() else 1e-8
  gain = np.sqrt(power / 10.0 ** (plan["snr_db"] / 10.0))
  return commands._to_int16(clip + gain * background), rate


def split_plans(seed: int, split: str, size: int) -> List[dict]:
  """The plans of one split, spoken by that split's voice variants only."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
  variants = commands.split_variants(seed)[split]
  return [example_plan(variants, np.random.default_rng([seed, SPLITS.index(split), i]))
          for i in range(size)]


def examples(seed: int, split: str, size: int) -> Iterator[Tuple[np.ndarray, dict]]:
  """``(int16 clip, plan with the rate spoken at)`` for every example of a split."""
  for plan in split_plans(seed, split, size):
    clip, rate = render(plan)
    yield clip, dict(plan, rate=rate)


def recognition_inputs(split, data_config=None):
  """TFDS ``audio``/``text`` -> ``{"inputs": {"audio": int16 [n, CLIP_SAMPLES],
  "target": int32 [n, TARGET_LENGTH]}, "label": the target}``."""
  del data_config  # clips need no per-experiment shaping
  audio = np.asarray(split["audio"])
  if audio.ndim != 2 or audio.shape[1] != CLIP_SAMPLES:
    raise ValueError(f"recognition_inputs expects audio [n, {CLIP_SAMPLES}] ({CLIP_SECONDS} s "
                     f"at {SAMPLE_RATE} Hz), got {audio.shape}")
  texts = [t.decode() if isinstance(t, bytes) else str(t) for t in split["text"]]
  target = encode(texts)
  return {"inputs": {"audio": audio.astype(np.int16), "target": target}, "label": target}
