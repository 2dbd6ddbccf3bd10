"""Speech recognition with attention (issue 18): the spoken-sentence grammar
and its eSpeak NG recipe with test voices unheard in training, the TFDS
builder, word and character error rates, the Transformer recogniser over
log-mel frames, the transcript pictures, and a tiny end-to-end run (slow)."""

import itertools
import re

import jax
import numpy as np
import pytest

import experiments
from attention_lab import data
from attention_lab import train
from attention_lab.data import sources
from attention_lab.data import spoken_sentences as ss
from attention_lab.models.speech_recognition import SpeechRecognizer
from attention_lab.models.speech_recognition import subsampled_frames
from attention_lab.train import tasks
from attention_lab.viz import transcripts
from conftest import assert_picture
from conftest import override
from conftest import train_stop_and_resume

# The grammar written out again, independently of the recipe's code.
_DIGIT = "(zero|one|two|three|four|five|six|seven|eight|nine)"
_COUNT = "(two|three|four|five)"
_GRAMMAR = re.compile(
    rf"^(turn (left|right) {_COUNT} times|call {_DIGIT}( {_DIGIT}){{2,3}}|"
    rf"go (forward|back|up|down) {_COUNT} steps|{_DIGIT}( {_DIGIT}){{2,4}})$")


def test_sentences_follow_the_grammar_and_fit_the_target():
  texts = [ss.sentence(np.random.default_rng([7, i])) for i in range(400)]
  assert all(_GRAMMAR.match(t) for t in texts), [t for t in texts if not _GRAMMAR.match(t)]
  # Every form is drawn.
  assert {t.split()[0] for t in texts} >= {"turn", "call", "go"}
  assert any(t.split()[0] not in ("turn", "call", "go") for t in texts)
  # The longest sentence of the grammar, by enumeration: five of the
  # longest digit words, then <eos>.
  longest = max(len(" ".join(w)) for w in itertools.product(
      ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
      repeat=5))
  assert ss.TARGET_LENGTH == longest + 1 == 30
  ids = ss.encode(["call five one two"])
  assert ids.shape == (1, ss.TARGET_LENGTH)
  assert "".join(ss.CHARS[i] for i in ids[0, :17]) == "call five one two"
  assert ids[0, 17] == ss.EOS_ID and (ids[0, 18:] == ss.PAD_ID).all()


def test_test_voices_are_unheard_in_training_and_plans_are_seeded():
  seed = 11
  variant = lambda plan: plan["speaker"].split("+", 1)[1]
  train_voices = {variant(p) for p in ss.split_plans(seed, "train", 300)}
  test_voices = {variant(p) for p in ss.split_plans(seed, "test", 100)}
  assert len(train_voices) > 20 and len(test_voices) > 5
  assert not train_voices & test_voices
  assert ss.split_plans(seed, "test", 5) == ss.split_plans(seed, "test", 5)
  assert ss.split_plans(seed, "test", 5) != ss.split_plans(seed + 1, "test", 5)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    ss.split_plans(seed, "dev", 1)


def test_a_long_sentence_is_spoken_faster_never_cut():
  text = "seven seven seven seven seven"
  slow, rate = ss.speak(text, "en+m3", 130, 50, 100)
  # At 130 words per minute it does not fit two seconds (measured ~2.6 s), so
  # the rate went up until it did.
  assert rate > 130 and len(slow) <= ss.CLIP_SAMPLES
  clip, used = ss.render(dict(ss.split_plans(3, "train", 1)[0], text=text, rate=130))
  assert clip.shape == (ss.CLIP_SAMPLES,) and clip.dtype == np.int16 and used > 130
  with pytest.raises(ValueError, match="longer than the 2 s clip"):
    ss.speak(" ".join(["seven"] * 40), "en", 450, 50, 100)


def test_error_rates_worked_by_hand():
  # "call five one two" -> "call five one": one of four words deleted, and
  # four of 17 characters (" two").
  rates = tasks.error_rates(["call five one", "turn left two times"],
                            ["call five one two", "turn left two times"])
  assert rates["wer"] == pytest.approx(1 / 8)
  assert rates["cer"] == pytest.approx(4 / (17 + 19))
  # A substitution and an insertion: "go up" -> "go down now".
  rates = tasks.error_rates(["go down now"], ["go up"])
  assert rates["wer"] == pytest.approx(2 / 2)
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    tasks.error_rates(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def sentences_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("spoken_sentences_tfds"))


def test_smoke_builder_and_pipeline(sentences_dir):
  train_split = sources.load_split("spoken_sentences_offline/smoke", "train", sentences_dir)
  test_split = sources.load_split("spoken_sentences_offline/smoke", "test", sentences_dir)
  assert train_split["audio"].shape == (64, ss.CLIP_SAMPLES)
  assert train_split["audio"].dtype == np.int16 and len(test_split["text"]) == 16
  assert all(_GRAMMAR.match(t.decode()) for t in test_split["text"])
  variants = lambda split: {s.decode().split("+", 1)[1] for s in split["speaker"]}
  assert not variants(train_split) & variants(test_split)
  # Speech is in the clip: louder than the noise floor somewhere.
  assert np.abs(test_split["audio"]).max(axis=1).min() > 1000

  config = experiments.get_config("spoken_sentences_las")
  config.data.name = "spoken_sentences_offline/smoke"
  config.data.data_dir = sentences_dir
  bundle = data.build(config)
  audio, target = bundle.eval["inputs"]["audio"], bundle.eval["inputs"]["target"]
  assert audio.shape == (16, ss.CLIP_SAMPLES) and audio.dtype == np.int16
  assert target.shape == (16, ss.TARGET_LENGTH) and target.dtype == np.int32
  assert tasks.token_text(target[0], bundle.vocabulary) == test_split["text"][0].decode()
  assert (bundle.eval["label"] == target).all()


def _tiny_recognizer():
  return SpeechRecognizer(vocab_size=len(ss.CHARS), target_length=6, num_layers=1,
                          num_heads=2, hidden_dim=16, mlp_dim=16, num_mels=20,
                          subsample_channels=4)


# Slow: compiling the recogniser's greedy decoding takes most of a minute on
# the 2-core CPU; test_mixed_precision builds and runs it by default.
@pytest.mark.slow
def test_recognizer_shapes_and_greedy_never_reads_the_target():
  model = _tiny_recognizer()
  rng = np.random.default_rng(0)
  audio = (rng.standard_normal((2, 8000)) * 3000).astype(np.int16)
  target = rng.integers(3, len(ss.CHARS), (2, 6)).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), {"audio": audio, "target": target})
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
  outputs, sown = apply(variables, {"audio": audio, "target": target})
  assert outputs["logits"].shape == (2, 6, len(ss.CHARS))
  assert outputs["tokens"].shape == (2, 6)
  # 8000 samples: 1 + (8000 - 400) // 160 = 48 frames; subsampled 48 -> 23 -> 11.
  assert subsampled_frames(48) == 11
  cross = [w for path, w in jax.tree_util.tree_leaves_with_path(sown)
           if "cross_attention" in jax.tree_util.keystr(path)]
  assert cross and cross[-1].shape == (2, 2, 6, 11)
  spectrogram = [w for path, w in jax.tree_util.tree_leaves_with_path(sown)
                 if "spectrogram" in jax.tree_util.keystr(path)]
  assert spectrogram[0].shape == (2, 48, 20)
  other, _ = apply(variables, {"audio": audio, "target": target[::-1]})
  np.testing.assert_array_equal(outputs["tokens"], other["tokens"])
  with pytest.raises(ValueError, match=r"expects target \[batch, 6\]"):
    model.apply(variables, {"audio": audio, "target": target[:, :4]})
  with pytest.raises(ValueError, match=r"expects inputs \{'audio', 'target'\}"):
    model.apply(variables, audio)


def test_drawer_names_bad_shapes(tmp_path):
  with pytest.raises(ValueError, match=r"alignment \(3, 10\), expected \[2, frames\]"):
    transcripts.draw_transcript(np.zeros((12, 20)), np.zeros((3, 10)), ["a", "b"],
                                str(tmp_path / "x.png"), "t")
  with pytest.raises(ValueError, match="needs the dataset's vocabulary"):
    transcripts.draw_transcript_examples(str(tmp_path), None, np.zeros((1, 3)),
                                         np.zeros((1, 3)), {})
  paths = transcripts.draw_transcript(np.random.default_rng(0).standard_normal((40, 20)),
                                      np.eye(2, 40), ["a", "<eos>"],
                                      str(tmp_path / "ok.png"), "t")
  assert_picture(next(iter(paths)))


@pytest.mark.slow
def test_recognition_trains_resumes_evaluates_draws_and_predicts(tmp_path, sentences_dir):
  config = experiments.get_config("spoken_sentences_las")
  config = override(config, **{
      "data.name": "spoken_sentences_offline/smoke", "data.data_dir": sentences_dir,
      "total_steps": 4, "batch_size": 8, "eval_batch_size": 16, "log_every": 2,
      "eval_every": 2, "checkpoint_every": 2, "optimizer.warmup_steps": 1,
      "viz.num_examples": 2, "model.hidden_dim": 16, "model.num_heads": 2,
      "model.mlp_dim": 16, "model.num_layers": 1, "model.subsample_channels": 4})
  workdir = str(tmp_path / "run")
  results = train_stop_and_resume(config, workdir)
  assert results["step"] == 4
  assert 0.0 <= results["eval_exact_match"] <= results["eval_token_accuracy"] <= 1.0
  assert results["eval_wer"] >= 0.0 and results["eval_cer"] >= 0.0
  paths = train.visualize_checkpoint(config, workdir)
  drawn = [p for p in paths if p.endswith("_transcript.png")]
  assert drawn
  for picture in drawn:
    assert_picture(picture)
  from scipy.io import wavfile
  wav = str(tmp_path / "said.wav")
  wavfile.write(wav, 16000, np.zeros(12000, np.int16))
  written = train.predict_checkpoint(config, workdir, ["0", "15", wav])
  assert len(written) == 3 and all(set(t) <= set(ss.CHARS[3:]) for t in written)
  with pytest.raises(ValueError, match="examples 0..15"):
    train.predict_checkpoint(config, workdir, ["16"])
  with pytest.raises(ValueError, match="neither an eval-split index nor a WAV file"):
    train.predict_checkpoint(config, workdir, [str(tmp_path / "missing.wav")])
  wavfile.write(wav, 8000, np.zeros(100, np.int16))
  with pytest.raises(ValueError, match="sampled at 8000 Hz"):
    train.predict_checkpoint(config, workdir, [wav])


@pytest.mark.slow
def test_spoken_sentences_las_reaches_target(tmp_path):
  """The target in docs/results.md: word error rate at most 5% on the 800
  test sentences spoken by unheard voices, data generated afresh (the time is
  in docs/results.md)."""
  config = experiments.get_config("spoken_sentences_las")
  config.data.data_dir = str(tmp_path / "tfds")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval_wer"] <= 0.05
