"""Translation of number words (issue 18): the num2words corpus and its TFDS
builder, the Transformer encoder-decoder and its key/value-cached decoding,
BLEU, the cross-attention pictures, and one tiny end-to-end run."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from attention_lab import data
from attention_lab import models
from attention_lab import train
from attention_lab.data import numbers
from attention_lab.data import sources
from attention_lab.models.transformer_seq2seq import TransformerSeq2Seq
from attention_lab.train import tasks
from attention_lab.viz import translation
from conftest import assert_picture
from conftest import override


# --- corpus --------------------------------------------------------------------

def test_words_cross_in_german_and_count_in_twenties_in_french():
  # Written out by hand: German puts the units (zwei) before the tens (vierzig).
  assert numbers.words(342, "en") == "three hundred and forty-two"
  assert numbers.words(342, "de") == "dreihundertzweiundvierzig"
  assert numbers.words(342, "fr") == "trois cent quarante-deux"
  assert numbers.words(99, "fr") == "quatre-vingt-dix-neuf"
  assert numbers.words(21_000, "de") == "einundzwanzigtausend"
  assert numbers.words(1_100, "en") == "one thousand, one hundred"


def test_words_rejects_what_the_corpus_does_not_hold():
  with pytest.raises(ValueError, match="outside 0..99,999"):
    numbers.words(100_000, "de")
  with pytest.raises(ValueError, match="unknown target language 'it'"):
    numbers.words(3, "it")


def test_lengths_and_characters_cover_the_longest_numbers_and_a_sample():
  # The longest number of each language below 100,000 (found by a search over
  # the whole range when the constants were set) fits exactly.
  assert len(numbers.words(73_373, "en")) == numbers.MAX_SOURCE_LENGTH - 1
  assert len(numbers.words(27_727, "de")) + 1 == numbers.TARGET_LENGTHS["de"]
  assert len(numbers.words(94_494, "fr")) + 1 == numbers.TARGET_LENGTHS["fr"]
  sample = np.random.default_rng(0).integers(0, numbers.LARGEST_NUMBER + 1, 400).tolist()
  for n in sample + [0, 80, 81, 71, 100, 1000, 99_999]:
    numbers.encode([numbers.words(n, "en")], numbers.MAX_SOURCE_LENGTH, add_eos=False)
    for language in numbers.LANGUAGES:
      text = numbers.words(n, language)
      ids = numbers.encode([text], numbers.TARGET_LENGTHS[language], add_eos=True)
      assert numbers.decode(ids[0]) == text


def test_encode_names_a_text_that_does_not_fit_or_has_a_foreign_character():
  with pytest.raises(ValueError, match="outside CHARS"):
    numbers.encode(["drei!"], 10, add_eos=False)
  with pytest.raises(ValueError, match="needs 6 ids with <eos>"):
    numbers.encode(["zwölf"], 5, add_eos=True)


def test_splits_hold_distinct_numbers_and_no_test_number_is_trained_on():
  sizes = {"train": 300, "validation": 50, "test": 80}
  splits = numbers.make_splits(7, sizes, "de", largest=999)
  found = {name: [n for _, _, n in examples] for name, examples in splits.items()}
  assert {k: len(v) for k, v in found.items()} == sizes
  for name, values in found.items():
    assert len(set(values)) == len(values), name
  assert not set(found["test"]) & set(found["train"])
  assert not set(found["validation"]) & set(found["train"])
  assert not set(found["test"]) & set(found["validation"])
  english, german, n = splits["test"][0]
  assert (english, german) == (numbers.words(n, "en"), numbers.words(n, "de"))
  assert numbers.make_splits(7, sizes, "de", largest=999) == splits
  assert numbers.make_splits(8, sizes, "de", largest=999) != splits
  with pytest.raises(ValueError, match="only 1,000"):
    numbers.split_numbers(0, {"train": 900, "test": 101}, largest=999)


@pytest.fixture(scope="module")
def numbers_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("numbers_tfds"))


def test_builder_smoke_config_and_pipeline(numbers_dir):
  train_split = sources.load_split("numbers_offline/smoke", "train", numbers_dir)
  test_split = sources.load_split("numbers_offline/smoke", "test", numbers_dir)
  assert len(train_split["number"]) == 256 and len(test_split["number"]) == 64
  assert not set(test_split["number"].tolist()) & set(train_split["number"].tolist())
  first = int(test_split["number"][0])
  assert test_split["target"][0].decode() == numbers.words(first, "de")

  config = experiments.get_config("numbers_transformer")
  config.data.name = "numbers_offline/smoke"
  config.data.data_dir = numbers_dir
  bundle = data.build(config)
  source, target = bundle.eval["inputs"]["source"], bundle.eval["inputs"]["target"]
  assert source.shape == (64, numbers.MAX_SOURCE_LENGTH)
  assert target.shape == (64, numbers.TARGET_LENGTHS["de"])
  assert numbers.decode(source[0]) == numbers.words(first, "en")
  assert numbers.decode(target[0]) == numbers.words(first, "de")
  assert (bundle.eval["label"] == target).all()


# --- the model and its cache ---------------------------------------------------

def _tiny_model(target_length=8, **fields):
  return TransformerSeq2Seq(vocab_size=len(numbers.CHARS), target_length=target_length,
                            num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, **fields)


def _batch(target_length=8, source_length=12):
  rng = np.random.default_rng(0)
  source = rng.integers(3, len(numbers.CHARS), (3, source_length)).astype(np.int32)
  source[0, 7:] = 0
  source[1, 3:] = 0
  target = rng.integers(3, len(numbers.CHARS), (3, target_length)).astype(np.int32)
  return {"source": jnp.asarray(source), "target": jnp.asarray(target)}


@pytest.fixture(scope="module")
def tiny():
  model = _tiny_model()
  inputs = _batch()
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), inputs)
  # Larger output weights spread the random model's logits, so its greedy
  # choice changes from step to step and the tokens test more than a constant.
  params = dict(variables["params"])
  params["output"] = dict(params["output"], kernel=params["output"]["kernel"] * 8)
  return model, {"params": params}, inputs


def test_cached_greedy_equals_recomputing_the_prefix_at_each_step(tiny):
  model, variables, inputs = tiny
  run = lambda method: jax.jit(lambda v, *a: model.apply(v, *a, method=method))
  cached = run(model.generate)(variables, inputs["source"])
  memory, lengths = run(model.encode)(variables, inputs["source"])
  decode = run(model.decode)
  # Reference: a plain Python loop over the true prefix (no padding, no cache):
  # the teacher-forced decoder over <bos> + the tokens chosen so far.
  prefix = np.full((3, 1), numbers.BOS_ID, np.int32)
  finished = np.zeros(3, bool)
  ref_tokens, ref_logits = [], []
  for _ in range(model.target_length):
    logits = np.asarray(decode(variables, memory, lengths, jnp.asarray(prefix)))[:, -1]
    token = np.where(finished, numbers.PAD_ID, logits.argmax(-1))
    finished |= token == numbers.EOS_ID
    ref_tokens.append(token)
    ref_logits.append(logits)
    prefix = np.concatenate([prefix, token[:, None].astype(np.int32)], axis=1)
  ref_tokens, ref_logits = np.stack(ref_tokens, 1), np.stack(ref_logits, 1)
  assert len({tuple(row) for row in ref_tokens.tolist()}) > 1
  assert len(set(ref_tokens[0].tolist())) > 1           # not one token repeated
  np.testing.assert_array_equal(np.asarray(cached["tokens"]), ref_tokens)
  np.testing.assert_allclose(np.asarray(cached["logits"]), ref_logits, rtol=1e-4, atol=1e-4)
  recomputed = run(model.generate_by_recompute)(variables, inputs["source"])
  np.testing.assert_array_equal(np.asarray(recomputed["tokens"]), ref_tokens)
  np.testing.assert_allclose(np.asarray(recomputed["logits"]), ref_logits,
                             rtol=1e-4, atol=1e-4)
  # The model's evaluation output is that same cached translation.
  outputs = jax.jit(model.apply)(variables, inputs)
  np.testing.assert_array_equal(np.asarray(outputs["tokens"]), ref_tokens)


@pytest.mark.slow   # beam search is checked against a NumPy beam search in the default suite
def test_beam_of_one_is_greedy_and_a_full_beam_finds_the_best_two_tokens(tiny):
  model, variables, inputs = tiny
  beam = lambda size, steps=None: jax.jit(lambda v, s: model.apply(
      v, s, beam_size=size, steps=steps, method=model.generate_beam))(variables, inputs["source"])
  greedy = jax.jit(lambda v, s: model.apply(v, s, method=model.generate))(
      variables, inputs["source"])
  np.testing.assert_array_equal(np.asarray(beam(1)["tokens"]), np.asarray(greedy["tokens"]))

  # Exhaustive reference over every two-token translation (a, b), scored by
  # the teacher-forced decoder in float64: log p(a) + log p(b | a); after
  # <eos> only padding may follow, at no cost.
  vocab = len(numbers.CHARS)
  memory, lengths = model.apply(variables, inputs["source"], method=model.encode)
  prefixes = np.stack([np.full(vocab, numbers.BOS_ID), np.arange(vocab)], 1).astype(np.int32)
  decode = jax.jit(lambda v, m, l, t: model.apply(v, m, l, t, method=model.decode))
  found = beam(vocab, steps=2)
  for row in range(3):
    logits = np.asarray(decode(variables, jnp.repeat(memory[row:row + 1], vocab, 0),
                               jnp.repeat(lengths[row:row + 1], vocab, 0),
                               jnp.asarray(prefixes)), np.float64)        # [a, 2, vocab]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scores = log_p[:, 0, :].diagonal()[:, None] + log_p[:, 1, :]         # [a, b]
    scores[numbers.EOS_ID] = -np.inf
    scores[numbers.EOS_ID, numbers.PAD_ID] = log_p[0, 0, numbers.EOS_ID]
    best = np.unravel_index(np.argmax(scores), scores.shape)
    assert np.asarray(found["tokens"][row]).tolist() == list(best)
    assert float(found["scores"][row, 0]) == pytest.approx(scores.max(), abs=1e-4)
    top = np.sort(scores.ravel())[::-1][:vocab]
    np.testing.assert_allclose(np.asarray(found["scores"][row]), top, atol=1e-4)


def test_beam_search_equals_a_plain_beam_search_over_recomputed_prefixes(tiny):
  # Six steps, so beams reorder (and their cache rows with them) after the
  # first tokens differ. Reference: NumPy bookkeeping over the teacher-forced
  # decoder run on each beam's whole prefix, no cache.
  model, variables, inputs = tiny
  k, steps = 3, 6
  found = jax.jit(lambda v, s: model.apply(v, s, beam_size=k, steps=steps,
                                           method=model.generate_beam))(variables, inputs["source"])
  memory, lengths = model.apply(variables, inputs["source"], method=model.encode)
  decode = jax.jit(lambda v, m, l, t: model.apply(v, m, l, t, method=model.decode))
  for row in range(3):
    beams = [([], 0.0, False)]                        # (tokens, log-probability, finished)
    for _ in range(steps):
      prefixes = np.array([[numbers.BOS_ID] + t for t, _, _ in beams], np.int32)
      logits = np.asarray(decode(variables, jnp.repeat(memory[row:row + 1], len(beams), 0),
                                 jnp.repeat(lengths[row:row + 1], len(beams), 0),
                                 jnp.asarray(prefixes)), np.float64)[:, -1]
      log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      candidates = []
      for (tokens, score, done), lp in zip(beams, log_p):
        if done:
          candidates.append((tokens + [numbers.PAD_ID], score, True))
        else:
          candidates += [(tokens + [t], score + lp[t], t == numbers.EOS_ID)
                         for t in range(len(lp))]
      beams = sorted(candidates, key=lambda c: -c[1])[:k]
    assert np.asarray(found["beams"][row]).tolist() == [t for t, _, _ in beams]
    np.testing.assert_allclose(np.asarray(found["scores"][row]), [s for _, s, _ in beams],
                               atol=1e-4)


def test_decoder_is_causal_and_source_padding_is_hidden(tiny):
  model, variables, inputs = tiny
  # train=True: the teacher-forced logits alone (dropout is off in this model).
  forced = jax.jit(lambda v, x: model.apply(v, x, train=True)["logits"])
  logits = forced(variables, inputs)
  changed = dict(inputs, target=inputs["target"].at[:, 5:].set(7))
  # Position t reads the target shifted right: tokens 0..t-1 only.
  after = forced(variables, changed)
  np.testing.assert_allclose(np.asarray(after[:, :6]), np.asarray(logits[:, :6]),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(after[:, 6:]), np.asarray(logits[:, 6:]))
  # More trailing padding on the source changes nothing (kv_lengths hide it).
  padded = dict(inputs, source=jnp.pad(inputs["source"], ((0, 0), (0, 5))))
  np.testing.assert_allclose(np.asarray(forced(variables, padded)),
                             np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_cross_attention_is_sown_for_the_models_own_translation(tiny):
  model, variables, inputs = tiny
  outputs, state = model.apply(variables, inputs, mutable=["intermediates"])
  layers = translation.cross_attention_layers(state["intermediates"], 12)
  assert [m for m, _ in layers] == ["decoder_block_0/cross_attention",
                                    "decoder_block_1/cross_attention"]
  weights = layers[0][1]
  assert weights.shape == (3, 2, 8, 12)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert np.all(weights[1, :, :, 3:] == 0)               # padded source keys
  # The last pass read the greedy translation, not the reference target.
  memory, lengths = model.apply(variables, inputs["source"], method=model.encode)
  _, own = model.apply(variables, memory, lengths,
                       jnp.concatenate([jnp.full((3, 1), numbers.BOS_ID, jnp.int32),
                                        outputs["tokens"][:, :-1]], 1),
                       method=model.decode, mutable=["intermediates"])
  np.testing.assert_allclose(
      weights, translation.cross_attention_layers(own["intermediates"], 12)[0][1],
      rtol=1e-5, atol=1e-6)


def test_model_builds_from_the_experiment_config_and_checks_shapes():
  config = experiments.get_config("numbers_transformer")
  model = models.build(config.model)
  assert isinstance(model, TransformerSeq2Seq)
  assert model.target_length == numbers.TARGET_LENGTHS["de"]
  with pytest.raises(ValueError, match=r"target \[batch, 8\]"):
    _tiny_model().init(jax.random.key(0), _batch(target_length=9))


def test_decoder_names_an_attention_setting_it_cannot_cache():
  from attention_lab.layers import AttentionConfig
  model = _tiny_model(attention=AttentionConfig(rotary="1d"))
  with pytest.raises(ValueError, match=r"attention.rotary='1d' is not supported by the cached"):
    model.init(jax.random.key(0), _batch())
  # What it does take passes: kernel, attention dropout, kernel options.
  from attention_lab.models.transformer_seq2seq import check_decoder_attention
  check_decoder_attention(AttentionConfig(kernel="reference", dropout_rate=0.1))


# --- BLEU ------------------------------------------------------------------------

def test_corpus_bleu_against_the_formula_worked_by_hand():
  # "abcde" vs "abcdf" in characters: 4/5 unigrams, 3/4 bigrams, 2/3 trigrams,
  # 1/2 four-grams match; equal lengths, so no brevity penalty.
  assert tasks.corpus_bleu(["abcde"], ["abcdf"]) == pytest.approx(
      100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-9)
  # A correct but short hypothesis: every n-gram matches, brevity penalty
  # exp(1 - reference / hypothesis length) = exp(1 - 6 / 4).
  assert tasks.corpus_bleu(["abcd"], ["abcdef"]) == pytest.approx(
      100 * math.exp(1 - 6 / 4), rel=1e-9)
  assert tasks.corpus_bleu(["dreihundertzweiundvierzig"] * 2,
                           ["dreihundertzweiundvierzig"] * 2) == pytest.approx(100.0)
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    tasks.corpus_bleu(["a", "b"], ["a"])


def test_seq2seq_corpus_metrics_read_translations_up_to_eos():
  vocabulary = numbers.CHARS
  labels = numbers.encode(["abcdf"], 8, add_eos=True)
  # <bos>, then "abcde", <eos> and characters after it that must not count.
  predictions = np.concatenate(
      [[[numbers.BOS_ID]], numbers.encode(["abcde"], 6, add_eos=True),
       numbers.encode(["zz"], 2, add_eos=False)], axis=1)
  assert tasks.token_text(predictions[0], vocabulary) == "abcde"
  metrics = tasks.get("seq2seq").corpus_metrics(predictions, labels, vocabulary)
  assert metrics == {"bleu": pytest.approx(100 * 0.2 ** 0.25)}


# --- pictures and a whole run --------------------------------------------------

def test_translation_drawer_names_a_wrong_shape(tmp_path):
  vocabulary = numbers.CHARS
  source = numbers.encode(["two"], 5, add_eos=False)
  labels = numbers.encode(["zwei"], 6, add_eos=True)
  weights = np.full((1, 2, 6, 5), 0.2, np.float32)
  intermediates = {"decoder_block_0": {"cross_attention": {"attention_weights": (weights,)}}}
  pictures = translation.draw_translation_examples(
      str(tmp_path), {"source": source}, labels, labels, intermediates, vocabulary)
  assert sorted(os.path.basename(p) for p in pictures) == [
      "example0_alignment.png", "example0_cross_attention.png"]
  for path in pictures:
    assert_picture(path)
  bad = {"decoder_block_0": {"cross_attention": {"attention_weights": (weights[..., :4],)}}}
  with pytest.raises(ValueError, match=r"decoder_block_0/cross_attention has shape \(1, 2, 6, 4\)"):
    translation.draw_translation_examples(
        str(tmp_path), {"source": source}, labels, labels, bad, vocabulary)


TINY_RUN = {"data.name": "numbers_offline/smoke", "total_steps": 4, "batch_size": 8,
            "eval_batch_size": 32, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
            "optimizer.warmup_steps": 1, "viz.num_examples": 2, "model.hidden_dim": 16,
            "model.num_heads": 2, "model.mlp_dim": 16, "model.num_layers": 1}


@pytest.mark.slow   # suite time; test_run.py's tiny run covers the loop, the units here the task
def test_numbers_transformer_trains_evaluates_and_draws(tmp_path, numbers_dir):
  config = experiments.get_config("numbers_transformer")
  config.data.data_dir = numbers_dir
  config = override(config, **TINY_RUN)
  workdir = str(tmp_path)
  results = train.train_and_evaluate(config, workdir)
  assert results["step"] == 4
  assert 0.0 <= results["eval_exact_match"] <= results["eval_token_accuracy"] <= 1.0
  assert 0.0 <= results["eval_bleu"] <= 100.0
  folder = os.path.join(workdir, "attention")
  grids = sorted(f for f in os.listdir(folder) if f.endswith("_cross_attention.png"))
  assert grids == ["example0_cross_attention.png", "example1_cross_attention.png"]
  for name in grids:
    assert_picture(os.path.join(folder, name))
  paths = train.visualize_checkpoint(config, workdir)
  assert any(p.endswith("_cross_attention.png") for p in paths)
  translations = train.predict_checkpoint(config, workdir, ["three hundred and forty-two",
                                                            "seven"])
  assert len(translations) == 2 and all(isinstance(t, str) for t in translations)
  assert set("".join(translations)) <= set(numbers.CHARS[3:])
  with pytest.raises(ValueError, match=r"characters \['!'\] the model never saw"):
    train.predict_checkpoint(config, workdir, ["seven!"])


def test_character_ids_pad_and_name_what_they_cannot_read():
  from attention_lab.train import loop
  ids = loop.character_ids(["ab", ""], numbers.CHARS, 4)
  assert ids.tolist() == [[numbers.CHAR_IDS["a"], numbers.CHAR_IDS["b"], 0, 0], [0, 0, 0, 0]]
  with pytest.raises(ValueError, match="has 5 characters; the model reads at most 4"):
    loop.character_ids(["abcde"], numbers.CHARS, 4)


@pytest.mark.slow
def test_decoding_benchmark_runs_in_quick_mode():
  """About 30 s on the shared 2-core machine (a fresh process compiles four
  decoders), hence slow."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", "decoding.py"), "--quick"],
                        cwd=root, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("machine: ")
  assert lines[1].startswith("load average (1 min) before: ")
  rows = [line for line in lines if line.startswith(("| 4 |", "| 8 |"))]
  assert len(rows) == 2
  for row in rows:
    cached, recompute, ratio = row.strip("| ").split(" | ")[1:]
    assert float(cached.split()[0]) > 0 and float(recompute.split()[0]) > 0
    assert ratio.endswith("x")


@pytest.mark.slow
def test_numbers_transformer_reaches_target(tmp_path):
  """The target in docs/results.md: >= 95% exact match on the 2,000 held-out
  numbers, data generated afresh (about 6 minutes: docs/results.md)."""
  config = experiments.get_config("numbers_transformer")
  config.data.data_dir = str(tmp_path / "tfds")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval_exact_match"] >= 0.95
