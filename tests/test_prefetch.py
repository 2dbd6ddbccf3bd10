"""The prefetch thread: same batches in the same order, errors surfaced, no
thread left behind. (End to end through the training loop: test_train.py.)"""

import threading
import time

import numpy as np
import pytest

from attention_lab.data import pipeline


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == pipeline.Prefetcher.THREAD_NAME]


def _batches(augment=True):
  """A real ``TrainBatches``: 10 examples, batches of 4 that straddle epochs."""
  arrays = {"inputs": np.arange(10 * 3, dtype=np.float32).reshape(10, 3),
            "label": np.arange(10)}
  noise = (lambda batch, rng: dict(batch, inputs=batch["inputs"] + rng.normal(size=(4, 3)))
           ) if augment else None
  return pipeline.TrainBatches(arrays, batch_size=4, seed=7, transform=noise)


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
@pytest.mark.parametrize("start", [0, 3])
def test_serves_exactly_the_batches_of_each_step(depth, start):
  want = _batches()          # built independently, read directly
  with pipeline.Prefetcher(_batches(), start=start, stop=12, depth=depth) as batches:
    for step in range(start, 12):
      got = batches.get(step)
      expected = want(step)
      assert set(got) == set(expected)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} of step {step}")
  assert not _prefetch_threads()


def test_refuses_a_step_out_of_order():
  with pipeline.Prefetcher(_batches(), start=0, stop=5, depth=2) as batches:
    batches.get(0)
    with pytest.raises(ValueError, match="asked for step 2; it serves step 1"):
      batches.get(2)
  assert not _prefetch_threads()


def test_an_error_in_the_thread_is_raised_by_get_with_its_message():
  def batches(step):
    if step == 3:
      raise KeyError("feature 'image' missing in shard 7")
    return {"step": step}

  with pipeline.Prefetcher(batches, start=0, stop=10, depth=2) as prefetched:
    assert [prefetched.get(s)["step"] for s in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="feature 'image' missing in shard 7") as error:
      prefetched.get(3)
  assert any("step 3" in note for note in error.value.__notes__)
  assert not _prefetch_threads()


def test_the_thread_stops_when_the_consumer_leaves_early():
  # The producer is blocked on a full queue (or mid-batch) when the loop stops:
  # a return, an error or KeyboardInterrupt in the with-block all end it.
  built = []

  def slow(step):
    built.append(step)
    time.sleep(0.01)
    return {"step": step}

  def consume(leave):
    with pipeline.Prefetcher(slow, start=0, stop=10_000, depth=2) as batches:
      assert batches.get(0) == {"step": 0}
      deadline = time.monotonic() + 30
      while len(built) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)                   # the queue fills; the producer waits with step 3
      if leave is not None:
        raise leave("stop")

  for leave in (None, RuntimeError, KeyboardInterrupt):
    built.clear()
    if leave is None:
      consume(None)                        # a plain return: nothing may be raised
    else:
      # The consumer's own exception leaves the with-block, unchanged.
      with pytest.raises(leave, match="^stop$"):
        consume(leave)
    assert not _prefetch_threads(), leave
    assert 4 <= len(built) <= 5, (leave, built)   # one served, two queued, one in hand


def test_no_thread_when_off_or_nothing_to_serve():
  for depth, start, stop in ((0, 0, 5), (2, 5, 5)):
    with pipeline.Prefetcher(_batches(), start=start, stop=stop, depth=depth):
      assert not _prefetch_threads()


def test_config_checks_the_two_options():
  import experiments
  from attention_lab.train import validation
  config = experiments.get_config("mnist_vit")
  assert config.data.prefetch == 2 and config.async_checkpoints is False   # the defaults
  assert validation.problems(config) == []
  config.data.prefetch = -1
  del config["async_checkpoints"]           # a ConfigDict keeps a field's type
  config.async_checkpoints = "yes"
  assert validation.problems(config) == [
      "config.async_checkpoints='yes': must be True or False",
      "config.data.prefetch=-1: must be an integer >= 0"]
