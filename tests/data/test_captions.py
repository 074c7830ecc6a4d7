"""Training captions are drawn deterministically and never equal an evaluation prompt."""

import numpy as np
import open_clip
import pytest

from gsclip_lib.data.captions import (
    FASHION_MNIST_EVAL_TEMPLATES,
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    TRAINING_CAPTION_TEMPLATES,
    caption_for,
    captions_for_labels,
    with_article,
)
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES


def test_captions_are_grammatical_and_indexed():
    assert caption_for("ankle boot", 0) == "a photo of an ankle boot."
    assert caption_for("t-shirt", 0) == "a photo of a t-shirt."
    assert caption_for("bag", 1) == "a black and white photo of a bag."
    # Indices wrap, so a sample's index can be passed directly.
    assert caption_for("coat", 3 + len(TRAINING_CAPTION_TEMPLATES)) == caption_for("coat", 3)
    assert with_article("Umbrella") == "an Umbrella"
    with pytest.raises(ValueError, match="non-empty"):
        with_article(" ")
    with pytest.raises(ValueError, match="template index or a numpy Generator"):
        caption_for("coat", 1.5)


def test_captions_from_a_seed_repeat_and_vary():
    first = [caption_for("dress", np.random.default_rng(5)) for _ in range(3)]
    assert len(set(first)) == 1  # the same seed, the same draw
    rng = np.random.default_rng(5)
    drawn = [caption_for("dress", rng) for _ in range(200)]
    assert drawn[0] == first[0]
    assert len(set(drawn)) == len(TRAINING_CAPTION_TEMPLATES)  # every template gets used

    labels = np.arange(100) % 10
    captions = captions_for_labels(labels, FASHION_MNIST_CLASSES, seed=11)
    assert captions == captions_for_labels(labels, FASHION_MNIST_CLASSES, seed=11)
    assert captions != captions_for_labels(labels, FASHION_MNIST_CLASSES, seed=12)
    assert all(FASHION_MNIST_CLASSES[label] in caption for label, caption in zip(labels, captions))
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        captions_for_labels([10], FASHION_MNIST_CLASSES, seed=0)


def test_evaluation_prompts_never_equal_training_captions():
    assert len(TRAINING_CAPTION_TEMPLATES) >= 8 and len(FASHION_MNIST_EVAL_TEMPLATES) >= 8
    assert not set(TRAINING_CAPTION_TEMPLATES) & set(FASHION_MNIST_EVAL_TEMPLATES)
    training = {caption_for(name, i) for name in FASHION_MNIST_CLASSES for i in range(len(TRAINING_CAPTION_TEMPLATES))}
    evaluation = {template.format(name) for name in FASHION_MNIST_CLASSES for template in FASHION_MNIST_EVAL_TEMPLATES}
    assert len(training) == 8 * 10 and len(evaluation) == len(FASHION_MNIST_EVAL_TEMPLATES) * 10
    assert not training & evaluation


def test_evaluation_templates_build_an_open_clip_classifier():
    class CountingTextModel:
        """Stands in for a CLIP model: one embedding per prompt, from its token ids."""

        def encode_text(self, tokens, normalize=False):
            embedding = tokens[:, :8].float() + 1.0
            return embedding / embedding.norm(dim=-1, keepdim=True) if normalize else embedding

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    weights = open_clip.build_zero_shot_classifier(
        CountingTextModel(), tokenizer, FASHION_MNIST_CLASSES, FASHION_MNIST_EVAL_TEMPLATES,
        num_classes_per_batch=4, device="cpu", use_tqdm=False,
    )
    assert tuple(weights.shape) == (8, 10)  # [embedding width, classes]
    np.testing.assert_allclose(weights.norm(dim=0).numpy(), 1.0, rtol=1e-6)


def test_imagenet_lists_are_open_clips_own():
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert IMAGENET_CLASSNAMES[0] == "tench" and IMAGENET_CLASSNAMES[-1] == "toilet paper"
    assert IMAGENET_CLASSNAMES == tuple(open_clip.IMAGENET_CLASSNAMES)
    assert OPENAI_IMAGENET_TEMPLATES is open_clip.OPENAI_IMAGENET_TEMPLATES
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert OPENAI_IMAGENET_TEMPLATES[0]("goldfish") == "a bad photo of a goldfish."
    assert "a photo of a goldfish." in {template("goldfish") for template in OPENAI_IMAGENET_TEMPLATES}
