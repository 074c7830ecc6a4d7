"""Stage ``evaluate``: zero-shot accuracy of every representation on every evaluation set (METHOD.md 4).

On each evaluation set (:func:`evaluation_sets`: the labelled evaluation shards, Fashion-MNIST's test
split by default, and, when configured, an ImageNet-style folder, whose images the fit and prune
stages turned into splats like any split) it scores zero-shot top-1 / top-5 of

- the RGB model on the images;
- every level's splat tower on the same images' splats;
- the RGB model on every level's splats rendered back to pixels (``render_back``): the control that
  says whether the splats or the tower lose the accuracy;
- the RGB model on the images re-encoded at each level's byte budget (JPEG and thumbnails:
  :mod:`gsclip_lib.evaluation.matched_bytes`).

It also reports the tokens and attention FLOPs of both towers (:mod:`gsclip_lib.evaluation.token_budget`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gsclip_lib.data.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.errors import InputError
from gsclip_lib.evaluation.matched_bytes import evaluate_matched_bytes, splat_level_budgets
from gsclip_lib.evaluation.token_budget import token_report
from gsclip_lib.evaluation.zero_shot import build_classifier, evaluate_zero_shot, image_shard_batches, splat_shard_batches
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.models.splat_clip import load_splat_clip
from gsclip_lib.params import IMAGENET_SPLIT, DataConfig, Params, level_name
from gsclip_lib.progress import progress_bar
from gsclip_lib.splats.codec import compression_ratio, payload_bytes, record_bytes, source_bytes
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.render import render_splats
from gsclip_lib.stages.align import teacher_model_config
from gsclip_lib.stages.prepare import imagenet_class_names
from gsclip_lib.stages.runner import StageResult

if TYPE_CHECKING:
    import pandas as pd

EVAL_CLASS_SOURCES = ("fashion_mnist", "imagenet")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: a split of the fit stage, its image shards and its zero-shot prompts."""

    split: str  # the split name under fit.level_dir(level, split): eval | imagenet
    image_shards: str
    class_names: tuple[str, ...]
    templates: tuple[Any, ...]


def class_names_and_templates(source: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """Class names and prompt templates for ``evaluate.eval_classes``.

    ``fashion_mnist``: its ten names with this project's CLIP-style evaluation prompts; ``imagenet``:
    open_clip's ImageNet-1K names and OpenAI templates; otherwise a text file with one name per line
    (label order), used with the OpenAI templates.
    """
    if source == "fashion_mnist":
        return tuple(FASHION_MNIST_CLASSES), tuple(FASHION_MNIST_EVAL_TEMPLATES)
    if source == "imagenet":
        return tuple(IMAGENET_CLASSNAMES), tuple(OPENAI_IMAGENET_TEMPLATES)
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"evaluate.eval_classes is {source!r}: neither {' nor '.join(EVAL_CLASS_SOURCES)} nor an existing file"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise InputError(f"{path} must hold one class name per line, without blank lines")
    return tuple(names), tuple(OPENAI_IMAGENET_TEMPLATES)


def evaluation_sets(params: Params) -> list[EvalSet]:
    """The evaluation sets of a run, in report order: ``data.eval_shards`` (labelled image shards,
    their class names from ``evaluate.eval_classes``) and, when ``data.imagenet_dir`` is set, the
    ImageNet-style folder (its names from the prepare stage, open_clip's OpenAI templates)."""
    data = params.data
    sets = []
    eval_spec = data.eval_spec()
    if eval_spec is not None:
        names, templates = class_names_and_templates(params.evaluate.eval_classes)
        sets.append(EvalSet("eval", eval_spec, names, templates))
    if data.imagenet_dir:
        sets.append(
            EvalSet(IMAGENET_SPLIT, data.imagenet_shards(), imagenet_class_names(data), tuple(OPENAI_IMAGENET_TEMPLATES))
        )
    return sets


def _level_row(level: int, data: DataConfig) -> dict[str, Any]:
    source = source_bytes(data.image_size, data.image_size, data.channels)
    payload = payload_bytes(level, data.channels)
    record = record_bytes(level, data.channels)
    return {
        "splats": level,
        "payload_bytes": payload,
        "record_bytes": record,
        "ratio_payload": round(compression_ratio(source, payload), 4),
        "ratio_record": round(compression_ratio(source, record), 4),
    }


def rendered_back(splats: Splats, image_size: int, backend: str = "auto") -> torch.Tensor:  # [B, C, S, S]
    """The splats drawn back to pixels and clamped to ``[0, 1]``: what the RGB model reads in the
    render-back control (the paper's check that the splats, not the tower, lose the accuracy)."""
    return render_splats(splats, image_size, image_size, backend=backend).clamp(0.0, 1.0)


def _headline(scores: dict[str, Any]) -> dict[str, Any]:
    return {key: scores[key] for key in ("top1", "top5", "images", "skipped", "per_class_top1", "correct_top1", "keys")}


def evaluate_all(params: Params, *, progress: bool = True) -> dict:
    """Zero-shot top-1/top-5 of the RGB model, every splat level and the baselines, plus tokens.

    Every evaluation set (:func:`evaluation_sets`) is scored the same way and reported under
    ``sets[<split>]``: the RGB model on the images (read as the fit stage read them), each level's
    splat tower on the same images' splats, and the RGB model on the images re-encoded at each
    level's byte budget.
    """
    started = time.perf_counter()
    data, evaluate, align = params.data, params.evaluate, params.align
    rgb = create_rgb_clip(teacher_model_config(params))
    rgb.model.eval()
    levels = params.levels()
    sets = evaluation_sets(params)
    towers = {level: load_splat_clip(align.tower_path(level), rgb).eval() for level in levels}

    def encode_rgb(images: torch.Tensor) -> torch.Tensor:
        return rgb.model.encode_image(rgb.prepare_images(images))

    results: dict[str, Any] = {"sets": {}}
    with torch.no_grad():
        for eval_set in sets:
            def rgb_batches(spec: str = eval_set.image_shards):
                return image_shard_batches(
                    spec, evaluate.batch_size, image_size=data.image_size,
                    resize_mode=data.resize_mode, channels=data.channels,
                )

            classifier = build_classifier(rgb.model, rgb.tokenizer, eval_set.class_names, eval_set.templates)
            scores: dict[str, Any] = {"classes": len(eval_set.class_names), "image_shards": eval_set.image_shards}
            scores["rgb"] = evaluate_zero_shot(encode_rgb, rgb_batches(), classifier)
            scores["rgb"]["source_bytes"] = source_bytes(data.image_size, data.image_size, data.channels)
            scores["levels"] = {}
            for level in progress_bar(levels, desc=f"{eval_set.split}: splat levels", disable=not progress):
                tower = towers[level]
                tower_classifier = build_classifier(tower, rgb.tokenizer, eval_set.class_names, eval_set.templates)
                level_scores = evaluate_zero_shot(
                    tower.encode_image,
                    splat_shard_batches(str(params.splat_dir(level, eval_set.split)), evaluate.batch_size),
                    tower_classifier,
                )
                render_back = evaluate_zero_shot(
                    lambda splats: encode_rgb(rendered_back(splats, data.image_size, params.fit.optimizer.backend)),
                    splat_shard_batches(str(params.splat_dir(level, eval_set.split)), evaluate.batch_size),
                    classifier,
                )
                scores["levels"][level_name(level)] = {
                    **_level_row(level, data), **level_scores, "render_back": _headline(render_back),
                }
            budgets = splat_level_budgets(levels, data.channels, evaluate.accounting)
            scores["baselines"] = evaluate_matched_bytes(
                encode_rgb, rgb_batches, classifier, budgets, list(evaluate.baselines)
            )
            results["sets"][eval_set.split] = scores
    visual = rgb.model.visual
    results["tokens"] = {
        level_name(level): token_report(
            rgb_image_size=rgb.image_size,
            patch_size=visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size,
            width=visual.transformer.width,
            layers=visual.transformer.layers,
            num_latents=align.encoder.num_latents,
            num_splats=level,
            resampler_layers=align.encoder.resampler_layers,
        )
        for level in levels
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def per_image_table(scores: dict[str, Any]) -> "pd.DataFrame":
    """One set's per-image top-1 hits, one row per image, one 0/1 column per representation.

    Columns: ``key``, ``rgb``, ``<level>`` (the tower), ``<level> render_back``, ``<method> <level>``
    (the matched-bytes baselines). Rows are matched by sample key, so the paired tests of the report
    compare the same images; an image missing from one representation (a fit that was dropped) is left
    out of every column and counted in ``unpaired``. Removes the per-image lists from ``scores``.
    """
    import pandas as pd

    columns = {"rgb": scores["rgb"]}
    for name, level in scores["levels"].items():
        columns[name] = level
        columns[f"{name} render_back"] = level["render_back"]
    for row in scores.get("baselines", []):
        columns[f"{row['method']} {row['level']}"] = row
    frames = []
    for column, result in columns.items():
        keys, correct = result.pop("keys", None), result.pop("correct_top1", None)
        if keys is None or correct is None:
            raise InputError(f"the {column} scores carry no sample keys: the paired tests cannot match images")
        frames.append(pd.Series(correct, index=pd.Index(keys, name="key"), name=column, dtype="int8"))
    table = pd.concat(frames, axis=1, join="inner")
    scores["paired_images"] = len(table)
    scores["unpaired"] = max(len(frame) for frame in frames) - len(table)
    return table.reset_index()


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers ``dvc metrics show`` lists: zero-shot top-1 (%) of RGB and of every level's tower,
    and each tower relative to RGB, on the first evaluation set."""
    split, scores = next(iter(metrics["sets"].items()))
    rgb = scores["rgb"]["top1"]
    top1 = {"rgb": round(100 * rgb, 1)}
    relative = {}
    for name, level in scores["levels"].items():
        top1[name] = round(100 * level["top1"], 1)
        relative[name] = round(level["top1"] / rgb, 3) if rgb else None
    return {"set": split, "top1": top1, "relative": relative}


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``evaluate`` stage: every score in ``metrics.json``, the per-image hits of every set in
    ``per_image.csv`` (a ``set`` column; what the paired tests read) and the headline in ``headline.json``."""
    import pandas as pd

    metrics = evaluate_all(params, progress=progress)
    hits = pd.concat([per_image_table(scores).assign(set=split) for split, scores in metrics["sets"].items()],
                     ignore_index=True)
    return StageResult(metrics=metrics, tables={"per_image": hits}, extra_json={"headline.json": headline(metrics)})


