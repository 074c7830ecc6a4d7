"""Zero-shot classification (gsclip_lib/evaluation/zero_shot.py) with stand-in towers whose answers are known."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsclip_lib.data.captions import FASHION_MNIST_EVAL_TEMPLATES
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.data.image_text_shards import write_image_text_shards
from gsclip_lib.evaluation.zero_shot import (
    EvalBatch,
    build_classifier,
    evaluate_zero_shot,
    image_shard_batches,
    splat_shard_batches,
)
from gsclip_lib.splats.codec import encode_splats
from gsclip_lib.splats.container import Splats

WIDTH = 16  # embedding width D of the stand-in towers


class PromptTable(torch.nn.Module):
    """A stand-in text tower: each prompt has a fixed embedding, ``one_hot(class) + 0.3 * noise``.

    Every prompt of a class shares the one-hot part and gets its own template noise, so a class's
    prompt ensemble differs from any single prompt but still points at its class.
    """

    def __init__(self, class_names, templates) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        prompts, rows = [], []
        for label, name in enumerate(class_names):
            for template in templates:
                prompts.append(template.format(name))
                noise = torch.randn(WIDTH, generator=generator)
                rows.append(F.one_hot(torch.tensor(label), WIDTH).float() + 0.3 * noise)
        self.index = {prompt: position for position, prompt in enumerate(prompts)}
        self.table = torch.nn.Parameter(torch.stack(rows))  # [P, D]

    def tokenize(self, texts: list[str]) -> torch.Tensor:  # [T] prompt ids
        return torch.tensor([self.index[text] for text in texts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:  # [T, D]
        embeddings = self.table[tokens]
        return F.normalize(embeddings, dim=-1) if normalize else embeddings


@pytest.fixture
def text_tower() -> PromptTable:
    return PromptTable(FASHION_MNIST_CLASSES, FASHION_MNIST_EVAL_TEMPLATES)


def test_classifier_is_the_renormalized_prompt_mean(text_tower: PromptTable) -> None:
    text_tower.train()
    classifier = build_classifier(
        text_tower, text_tower.tokenize, FASHION_MNIST_CLASSES, FASHION_MNIST_EVAL_TEMPLATES
    )
    assert classifier.shape == (WIDTH, len(FASHION_MNIST_CLASSES))
    assert text_tower.training  # put back in the mode it came in
    templates = len(FASHION_MNIST_EVAL_TEMPLATES)
    prompts = F.normalize(text_tower.table.detach(), dim=-1).reshape(len(FASHION_MNIST_CLASSES), templates, WIDTH)
    expected = F.normalize(prompts.mean(dim=1), dim=-1).T
    torch.testing.assert_close(classifier, expected)
    assert torch.equal(classifier.argmax(dim=0), torch.arange(len(FASHION_MNIST_CLASSES)))


def test_separable_embeddings_score_100_percent(text_tower: PromptTable) -> None:
    classifier = build_classifier(
        text_tower, text_tower.tokenize, FASHION_MNIST_CLASSES, FASHION_MNIST_EVAL_TEMPLATES
    )
    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([0] * 7 + [1] * 3 + list(range(2, 10)) * 4 + [9] * 5)

    def encode(inputs: torch.Tensor) -> torch.Tensor:  # the true class's text embedding, plus noise
        noise = 0.02 * torch.randn(inputs.shape[0], WIDTH, generator=generator)
        return 3.0 * classifier.T[inputs] + noise  # any scale: embeddings are normalized

    batches = [(labels[i : i + 8], labels[i : i + 8]) for i in range(0, len(labels), 8)]
    metrics = evaluate_zero_shot(encode, batches, classifier)
    assert metrics["top1"] == 1.0 and metrics["top5"] == 1.0 and metrics["top5_k"] == 5
    assert metrics["images"] == len(labels) and metrics["skipped"] == 0
    assert metrics["per_class_images"] == [7, 3, 4, 4, 4, 4, 4, 4, 4, 9]
    assert metrics["per_class_top1"] == [1.0] * 10
    assert metrics["cross_entropy"] < 0.1


def test_top1_and_top5_counted_by_rank() -> None:
    """Identity classifier; class 0 ranks 2nd, class 1 ranks 6th, every other class 1st."""
    classes = 10
    classifier = torch.eye(classes)

    def encode(labels: torch.Tensor) -> torch.Tensor:
        embeddings = F.one_hot(labels, classes).float()
        for row, label in enumerate(labels.tolist()):
            if label == 0:
                embeddings[row, 5] = 2.0  # one class above the truth
            if label == 1:
                embeddings[row, 1] = 0.1
                for rank, other in enumerate((2, 3, 4, 5, 6)):  # five classes above the truth
                    embeddings[row, other] = 1.0 - 0.1 * rank
        return embeddings

    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    metrics = evaluate_zero_shot(encode, [EvalBatch(labels, labels, 3)], classifier)
    assert metrics["top1"] == pytest.approx(9 / 12)
    assert metrics["top5"] == pytest.approx(11 / 12)
    assert metrics["top5"] >= metrics["top1"]
    assert metrics["per_class_top1"][:3] == [0.0, 0.0, 1.0]
    assert metrics["skipped"] == 3


def test_top5_with_fewer_than_five_classes_and_empty_classes() -> None:
    classifier = torch.eye(3)
    labels = torch.tensor([0, 0, 2])
    always_class_1 = lambda x: F.one_hot(torch.ones_like(x), 3).float()  # noqa: E731
    metrics = evaluate_zero_shot(always_class_1, [(labels, labels)], classifier)
    assert metrics["top5_k"] == 3 and metrics["top5"] == 1.0  # top-3 of 3 classes always hits
    assert metrics["top1"] == 0.0
    assert metrics["per_class_top1"] == [0.0, None, 0.0]
    assert metrics["per_class_images"] == [2, 0, 1]


def test_bad_labels_and_empty_sets_are_refused() -> None:
    classifier = torch.eye(3)
    encode = lambda x: F.one_hot(x.clamp(min=0), 3).float()  # noqa: E731
    with pytest.raises(ValueError, match="label -1 is outside"):
        evaluate_zero_shot(encode, [(torch.tensor([0, -1]), torch.tensor([0, -1]))], classifier)
    empty = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"no image was scored \(4 skipped\)"):
        evaluate_zero_shot(encode, [EvalBatch(empty, empty, 4)], classifier)
    with pytest.raises(ValueError, match="embedding width 5"):
        evaluate_zero_shot(lambda x: torch.ones(1, 5), [(torch.tensor([0]), torch.tensor([0]))], classifier)


# ----------------------------------------------------------------------------------------------
# The batch helpers, read end to end with an encoder that can only be right if the data arrive intact


def brightness_encoder(images: torch.Tensor) -> torch.Tensor:  # [B, C, S, S] -> [B, 2]: dark, bright
    mean = images.mean(dim=(1, 2, 3))
    return torch.stack([1 - mean, mean], dim=-1)


def test_image_shard_batches_read_labels_and_skips(tmp_path) -> None:
    samples = []
    for index in range(7):
        label = index % 2  # 0 dark, 1 bright
        image = np.full((6, 6), 30 if label == 0 else 220, np.uint8)
        samples.append((f"s{index}", image, f"caption {index}", {"label": label}))
    samples.append(("nocaption", np.zeros((6, 6), np.uint8), "   ", {"label": 0}))  # skipped
    write_image_text_shards(samples, os.path.join(tmp_path, "eval-%06d.tar"), 3)
    classifier = torch.eye(2)
    batches = image_shard_batches(str(tmp_path), batch_size=4, channels=1)
    metrics = evaluate_zero_shot(brightness_encoder, batches, classifier)
    assert metrics["top1"] == 1.0
    assert (metrics["images"], metrics["skipped"]) == (7, 1)
    assert metrics["per_class_images"] == [4, 3]


def test_splat_shard_batches_pad_and_mask(tmp_path) -> None:
    """Images with 1, 2 or 3 splats labelled by their count; the encoder sees only the valid mask."""
    path = tmp_path / "eval-000000.tar"
    labels = [0, 1, 2, 2, 1, 0, 2]
    with tarfile.open(path, "w") as archive:
        for index, label in enumerate(labels):
            count = label + 1
            splats = Splats.from_tensors(
                torch.rand(1, count, 2) * 8,
                torch.tensor([[[1.0, 0.0, 1.0]]]).repeat(1, count, 1),
                torch.rand(1, count, 1),
            )
            members = {
                "gs": encode_splats(splats, 0, 8, 8),
                "txt": b"a caption",
                "json": json.dumps({"label": label}).encode(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"k{index:03d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    seen_slots = []

    def encode(splats: Splats) -> torch.Tensor:
        seen_slots.append(splats.num_slots)
        return F.one_hot(splats.counts() - 1, 3).float()

    batches = splat_shard_batches(str(tmp_path), batch_size=4, num_slots=5)
    metrics = evaluate_zero_shot(encode, batches, torch.eye(3))
    assert metrics["top1"] == 1.0 and metrics["images"] == len(labels)
    assert metrics["per_class_images"] == [2, 2, 3]
    assert seen_slots == [5, 5]  # padded to num_slots, padding invalid


def test_classifier_from_a_real_open_clip_model() -> None:
    """A tiny randomly initialized open_clip CLIP and its real BPE tokenizer, prompts as callables."""
    import open_clip

    model = open_clip.CLIP(
        embed_dim=WIDTH,
        vision_cfg={"image_size": 28, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names = FASHION_MNIST_CLASSES[:3]
    templates = (lambda c: f"a photo of the {c}.", lambda c: f"itap of the {c}.")
    classifier = build_classifier(model, tokenizer, names, templates)
    assert classifier.shape == (WIDTH, 3)
    with torch.no_grad():
        for column, name in enumerate(names):
            texts = tokenizer([template(name) for template in templates])
            expected = F.normalize(F.normalize(model.encode_text(texts), dim=-1).mean(dim=0), dim=0)
            torch.testing.assert_close(classifier[:, column], expected)
