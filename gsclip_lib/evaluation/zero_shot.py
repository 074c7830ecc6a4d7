"""Zero-shot classification: the paper's evaluation of an image tower against text prompts (METHOD.md 4).

CLIP's recipe (Radford et al. 2021, section 3.1.4): each class becomes the mean of the L2-normalized
text embeddings of several prompts ("a photo of the {}.", ...), renormalized; an image is assigned
the class whose column has the largest cosine with its L2-normalized embedding. The classifier is
built by ``open_clip.build_zero_shot_classifier``, so the prompt ensembling is open_clip's own.

The evaluator is indifferent to what an image is. ``encode_images`` maps whatever a batch holds to
embeddings ``[B, D]``: an RGB tower takes a ``[B, C, S, S]`` float tensor, the splat tower
(``SplatImageEncoder``) takes a :class:`gsclip_lib.splats.container.Splats` batch. The batch helpers below read
the two evaluation sources of this project and both yield :class:`EvalBatch` ``(inputs, labels,
skipped)``: RGB images from image shards (the Fashion-MNIST eval split, the ImageNet-style folder once
prepared) and splats from splat shards (one level per folder). The evaluator also accepts plain ``(inputs, labels)`` pairs.

Metrics are fractions in [0, 1]. ``top5`` is top-``min(5, K)`` (with K <= 5 classes it is 1 by
definition, so it is reported with the ``k`` used). ``logit_scale`` only matters for the reported
cross-entropy: it multiplies all logits of an image alike, so it cannot change a ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import ImageTextShards, collate_image_text
from gsclip_lib.data.splat_shards import collate_splats, splat_dataset
from gsclip_lib.data.tar_shards import ShardSpec
from gsclip_lib.errors import positive_int

TOP_K = 5


class EvalBatch(NamedTuple):
    """One evaluation batch: what the image encoder reads, the true labels, and images dropped."""

    inputs: Any  # Tensor [B, C, S, S] float in [0, 1], or Splats [B, N, ...]
    labels: Tensor  # [B] int64 in [0, K)
    skipped: int = 0  # samples of this stretch of the data that could not be read (not in ``inputs``)
    keys: Sequence[str] | None = None  # [B] sample keys, when the source has them (pairs the same image across sources)


def build_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: torch.device | str | None = None,
) -> Tensor:  # [D, K], unit-norm columns
    """The zero-shot classifier: per class, the renormalized mean of its prompts' text embeddings.

    ``model`` is anything with ``encode_text(tokens, normalize=True) -> [T, D]`` (an open_clip
    ``CLIP``); ``templates`` are format strings or callables (``OPENAI_IMAGENET_TEMPLATES``).
    ``device`` defaults to the device of the model's parameters (the CPU when it has none). The model
    is put in eval mode for the call and returned to its previous mode.
    """
    class_names = list(class_names)
    templates = tuple(templates)
    if not class_names:
        raise ValueError("need at least one class name")
    if not templates:
        raise ValueError("need at least one prompt template")
    if device is None:
        device = distributed.model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        classifier = open_clip.build_zero_shot_classifier(
            model,
            tokenizer,
            classnames=class_names,
            templates=templates,
            num_classes_per_batch=10,
            device=device,
            use_tqdm=False,
        )
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return classifier.float()


def evaluate_zero_shot(
    encode_images: Callable[[Any], Tensor],
    batches: Iterable[EvalBatch | tuple[Any, Tensor]],
    classifier: Tensor,  # [D, K], as from build_classifier
    logit_scale: float = 100.0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Top-1 and top-``min(5, K)`` accuracy of ``encode_images`` over ``batches``.

    Each batch is ``(inputs, labels)`` or ``(inputs, labels, skipped)``; ``inputs`` is moved to
    ``device`` when one is given (tensors and ``Splats`` alike), otherwise passed as it comes.
    Embeddings are L2-normalized before the cosine with the classifier's columns. Returns
    ``top1``, ``top5`` and ``top5_k`` (the k used), ``images`` (scored), ``skipped`` (summed over the
    batches), ``cross_entropy`` (mean, at ``logit_scale``), ``per_class_top1`` (a list of K, ``None``
    for a class with no image) and ``per_class_images``. Raises ``ValueError`` when no image was
    scored, or when a label is outside ``[0, K)`` (-1, a sample without a label, included).
    """
    if classifier.ndim != 2:
        raise ValueError(f"classifier must be [D, K], got shape {tuple(classifier.shape)}")
    tally = _ZeroShotTally(classifier.shape[1])
    with torch.no_grad():
        for batch in batches:
            inputs, labels, skipped = unpack_batch(batch)
            tally.skipped += skipped
            tally.add_keys(getattr(batch, "keys", None))
            labels = _checked_labels(labels, tally.num_classes)
            if labels.numel() == 0:
                continue
            if device is not None:
                inputs = inputs.to(device)
            embeddings = _checked_embeddings(encode_images(inputs), labels.numel(), classifier.shape[0])
            embeddings = F.normalize(embeddings.float(), dim=-1)
            logits = logit_scale * embeddings @ classifier.to(embeddings.device, torch.float32)
            tally.add(logits.cpu(), labels)
    return tally.result()


class _ZeroShotTally:
    """Per-class hits of an evaluation so far, and every image's top-1 hit in order."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.k = min(TOP_K, num_classes)
        self.correct1 = torch.zeros(num_classes, dtype=torch.int64)
        self.correct_k = torch.zeros(num_classes, dtype=torch.int64)
        self.seen = torch.zeros(num_classes, dtype=torch.int64)
        self.loss_sum, self.skipped = 0.0, 0
        self.per_image_correct: list[int] = []
        self.per_image_keys: list[str] | None = []  # None once a batch came without keys

    def add_keys(self, keys: Sequence[str] | None) -> None:
        if keys is None or self.per_image_keys is None:
            self.per_image_keys = None
        else:
            self.per_image_keys.extend(keys)

    def add(self, logits: Tensor, labels: Tensor) -> None:  # logits [B, K] on the CPU, labels [B]
        ranked = logits.topk(self.k, dim=-1).indices  # [B, k]
        hit_k = (ranked == labels[:, None]).any(dim=-1)
        hit_1 = ranked[:, 0] == labels
        self.per_image_correct.extend(int(hit) for hit in hit_1)
        self.seen += torch.bincount(labels, minlength=self.num_classes)
        self.correct1 += torch.bincount(labels[hit_1], minlength=self.num_classes)
        self.correct_k += torch.bincount(labels[hit_k], minlength=self.num_classes)
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))

    def result(self) -> dict[str, Any]:
        images = int(self.seen.sum())
        if images == 0:
            raise ValueError(f"no image was scored ({self.skipped} skipped): nothing to report")
        return {
            "top1": int(self.correct1.sum()) / images,
            "top5": int(self.correct_k.sum()) / images,
            "top5_k": self.k,
            "images": images,
            "skipped": self.skipped,
            "cross_entropy": self.loss_sum / images,
            "per_class_top1": [(int(c) / int(n)) if int(n) > 0 else None for c, n in zip(self.correct1, self.seen)],
            "per_class_images": [int(n) for n in self.seen],
            "correct_top1": self.per_image_correct,  # [images] 0/1 in the order the batches came
            "keys": self.per_image_keys,  # [images] sample keys, or None when a batch carried none
        }


def _checked_labels(labels: Any, num_classes: int) -> Tensor:  # [B] int64 on the CPU
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).cpu()
    if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(
            f"label {bad} is outside [0, {num_classes}): every evaluation image needs a class "
            "label (-1 means the sample had none)"
        )
    return labels


def _checked_embeddings(embeddings: Tensor, count: int, width: int) -> Tensor:  # [B, D]
    if embeddings.ndim != 2 or embeddings.shape[0] != count:
        raise ValueError(f"encode_images returned shape {tuple(embeddings.shape)} for {count} labels; expected [B, D]")
    if embeddings.shape[1] != width:
        raise ValueError(f"embedding width {embeddings.shape[1]} does not match the classifier's {width}")
    return embeddings


# ----------------------------------------------------------------------------------------------
# Evaluation batches


def image_shard_batches(
    spec: ShardSpec,
    batch_size: int,
    *,
    image_size: int | None = None,
    resize_mode: str = "center_crop",
    channels: int = 3,
    num_workers: int = 0,
) -> Iterator[EvalBatch]:
    """RGB (or gray) images and labels of image shards, e.g. the Fashion-MNIST eval split.

    The whole set is read by this process (rank 0 of 1). ``skipped`` carries the samples the shard
    reader dropped (``SkipCounts.skipped``; shard-level failures are logged by the reader).
    """
    dataset = ImageTextShards(
        spec,
        image_size=image_size,
        resize_mode=resize_mode,
        channels=channels,
        rank=0,
        world_size=1,
    )
    loader = DataLoader(
        dataset, batch_size=positive_int(batch_size, "batch_size"), collate_fn=collate_image_text, num_workers=num_workers
    )
    for batch in loader:
        yield EvalBatch(batch.images, batch.labels, batch.skips.skipped, batch.keys)


def splat_shard_batches(
    spec: ShardSpec,
    batch_size: int,
    *,
    num_slots: int | None = None,
    num_workers: int = 0,
) -> Iterator[EvalBatch]:
    """Splats (padded with invalid slots, see ``collate_splats``) and labels of one level's shards.

    ``num_slots`` fixes the padded splat count (default: each batch's largest count).
    """
    dataset = splat_dataset(spec, rank=0, world_size=1)
    loader = DataLoader(
        dataset,
        batch_size=positive_int(batch_size, "batch_size"),
        collate_fn=partial(collate_splats, num_slots=num_slots),
        num_workers=num_workers,
    )
    for batch in loader:
        yield EvalBatch(batch.splats, batch.labels, batch.skips.skipped, batch.keys)


def unpack_batch(batch: EvalBatch | Sequence[Any]) -> tuple[Any, Tensor, int]:
    """``(inputs, labels, skipped)`` of an :class:`EvalBatch` or a plain ``(inputs, labels)`` pair."""
    if len(batch) == 2:
        inputs, labels = batch
        return inputs, labels, 0
    if len(batch) in (3, 4):
        inputs, labels, skipped = batch[:3]
        return inputs, labels, int(skipped)
    raise ValueError(f"a batch must be (inputs, labels) or (inputs, labels, skipped[, keys]), got {len(batch)} items")
