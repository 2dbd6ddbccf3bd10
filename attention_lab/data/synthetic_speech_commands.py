"""Spoken commands, synthesised offline: the recipe of ``speech_commands_offline``.

Twelve classes as in TFDS ``speech_commands`` (same names, same order): the
ten command words, ``_silence_`` (background noise only) and ``_unknown_``
(other words). Every example is one second at 16 kHz, int16.

A speaker is an English accent with an eSpeak NG voice variant
(``en-us+m3``). The variants are dealt to the splits by a seeded shuffle, so
validation and test examples are spoken by variants never heard in
training: the test measures recognition of unheard voices. Each example
draws its speaking rate, pitch, amplitude, time shift, background noise
(white, pink, brown or mains hum) and signal-to-noise ratio from
``numpy.random.default_rng([seed, split, index])``.

Reproducibility: the recipe (which speaker says which word, how fast, how
loud, with what noise) is fixed by the seed; eSpeak's samples are not
bit-identical between renders (see ``speech_synth``), so a prepared dataset
is the fixed artefact, and a re-render is equal up to small differences.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from attention_lab.data import speech_synth

SAMPLE_RATE = speech_synth.SAMPLE_RATE
CLIP_SAMPLES = speech_synth.CLIP_SAMPLES

# TFDS speech_commands' label order.
WORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
LABELS = WORDS + (SILENCE, UNKNOWN)

# Speech Commands' auxiliary words (v1 and v2), spoken for ``_unknown_``.
UNKNOWN_WORDS = (
    "backward", "bed", "bird", "cat", "dog", "eight", "five", "follow", "forward",
    "four", "happy", "house", "learn", "marvin", "nine", "one", "seven", "sheila",
    "six", "three", "tree", "two", "visual", "wow", "zero")

# Every split hears every accent; voice variants are what the splits keep apart.
ACCENTS = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")

# eSpeak NG's voice variants (espeak-ng-data/voices/!v of espeakng-loader
# 0.2.x), listed here so that the split of speakers does not depend on what a
# later package version ships.
VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis",
    "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario",
    "Michael", "Mike", "Mr serious", "Nguyen", "Reed", "RicishayMax", "RicishayMax2",
    "RicishayMax3", "Storm", "Tweaky", "UniRobot", "adam", "anika", "anikaRobot",
    "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "croak",
    "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5", "fast", "grandma",
    "grandpa", "gustave", "ian", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3",
    "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "mike2",
    "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "robosoft",
    "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7",
    "robosoft8", "sandro", "shelby", "steph", "steph2", "steph3", "travis", "victor",
    "whisper", "whisperf", "zac")

SPLITS = ("train", "validation", "test")
# Shares of the voice variants per split.
VARIANT_SHARES = {"train": 0.7, "validation": 0.1, "test": 0.2}

RATE_WPM = (120, 240)           # eSpeak words per minute
PITCH = (20, 80)                # eSpeak pitch, 0..100
AMPLITUDE = (30, 110)           # eSpeak amplitude, 0..200 (100 is its default)
MAX_SHIFT = 2400                # samples (150 ms) either side of centre
SNR_DB = (5.0, 30.0)            # speech-to-noise power ratio of word examples
SILENCE_DBFS = (-70.0, -25.0)   # RMS level of the noise in _silence_ examples
NOISES = ("white", "pink", "brown", "hum")


def split_variants(seed: int) -> Dict[str, Tuple[str, ...]]:
  """Voice variants of each split: disjoint, together all of ``VARIANTS``."""
  order = np.random.default_rng(seed).permutation(len(VARIANTS))
  n_train = int(round(VARIANT_SHARES["train"] * len(VARIANTS)))
  n_validation = int(round(VARIANT_SHARES["validation"] * len(VARIANTS)))
  parts = (order[:n_train], order[n_train:n_train + n_validation],
           order[n_train + n_validation:])
  return {split: tuple(sorted(VARIANTS[i] for i in part))
          for split, part in zip(SPLITS, parts)}


def noise(kind: str, samples: int, rng: np.random.Generator) -> np.ndarray:
  """Unit-RMS background noise ``[samples]`` float32.

  ``white``: flat spectrum; ``pink``: power ~ 1/f; ``brown``: ~ 1/f^2 (rumble);
  ``hum``: 50 or 60 Hz mains and its harmonics, with a little white noise.
  """
  if kind == "hum":
    t = np.arange(samples) / SAMPLE_RATE
    base = rng.choice([50.0, 60.0])
    x = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * base * h * t + rng.uniform(0, 2 * np.pi))
            for h in range(1, 6))
    x = x + 0.05 * rng.standard_normal(samples)
  elif kind in ("white", "pink", "brown"):
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    f = np.maximum(np.fft.rfftfreq(samples, 1.0 / SAMPLE_RATE), 20.0)  # no DC blow-up
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]      # amplitude ~ f^-exp
    x = np.fft.irfft(spectrum / f ** exponent, n=samples)
  else:
    raise ValueError(f"unknown noise {kind!r}; known: {', '.join(NOISES)}")
  return (x / max(np.sqrt(np.mean(x ** 2)), 1e-12)).astype(np.float32)


def _to_int16(clip: np.ndarray) -> np.ndarray:
  return np.clip(np.round(clip * 32767.0), -32768, 32767).astype(np.int16)


def example_plan(label: str, variants: Sequence[str], rng: np.random.Generator) -> dict:
  """The random choices of one example (everything but eSpeak's samples)."""
  plan = {"label": label, "noise": NOISES[rng.integers(len(NOISES))]}
  if label == SILENCE:
    plan.update(word="", speaker="", level_dbfs=rng.uniform(*SILENCE_DBFS))
  else:
    word = label if label != UNKNOWN else UNKNOWN_WORDS[rng.integers(len(UNKNOWN_WORDS))]
    accent = ACCENTS[rng.integers(len(ACCENTS))]
    variant = variants[rng.integers(len(variants))]
    plan.update(word=word, speaker=f"{accent}+{variant}",
                rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                amplitude=int(rng.integers(AMPLITUDE[0], AMPLITUDE[1] + 1)),
                shift=int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1)),
                snr_db=rng.uniform(*SNR_DB))
  plan["noise_seed"] = int(rng.integers(2 ** 31))
  return plan


def render(plan: dict) -> np.ndarray:
  """One example's clip, int16 ``[CLIP_SAMPLES]``, from ``example_plan``."""
  noise_rng = np.random.default_rng(plan["noise_seed"])
  background = noise(plan["noise"], CLIP_SAMPLES, noise_rng)
  if plan["label"] == SILENCE:
    return _to_int16(background * 10.0 ** (plan["level_dbfs"] / 20.0))
  speech = speech_synth.spoken_word(plan["word"], plan["speaker"], plan["rate"],
                                    plan["pitch"], plan["amplitude"], plan["shift"])
  voiced = np.abs(speech) > 1e-4
  power = float(np.mean(speech[voiced] ** 2)) if voiced.any() else 1e-8
  gain = np.sqrt(power / 10.0 ** (plan["snr_db"] / 10.0))
  return _to_int16(speech + gain * background)


def split_plans(seed: int, split: str, size: int) -> List[dict]:
  """The plans of one split: labels balanced (``size // 12`` each, the rest
  spread over the first labels) and shuffled."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
  variants = split_variants(seed)[split]
  labels = [LABELS[i % len(LABELS)] for i in range(size)]
  order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(size)
  return [example_plan(labels[j], variants,
                       np.random.default_rng([seed, SPLITS.index(split), i]))
          for i, j in enumerate(order)]


def examples(seed: int, split: str, size: int) -> Iterator[Tuple[np.ndarray, dict]]:
  """``(int16 clip, plan)`` for every example of a split."""
  for plan in split_plans(seed, split, size):
    yield render(plan), plan
