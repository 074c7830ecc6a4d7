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

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gsclip_lib.data.captions import OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.evaluation.class_prompts import class_names_and_templates, folder_class_names
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
from gsclip_lib.pipeline.runner import StageResult

if TYPE_CHECKING:
    import pandas as pd

@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: a split of the fit stage, its image shards and its zero-shot prompts."""

    split: str  # the split name under fit.level_dir(level, split): eval | imagenet
    image_shards: str
    class_names: tuple[str, ...]
    templates: tuple[Any, ...]


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
            EvalSet(IMAGENET_SPLIT, data.imagenet_shards(), folder_class_names(data.imagenet_classes_file()),
                    tuple(OPENAI_IMAGENET_TEMPLATES))
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


def encode_pixels(rgb: Any, images: torch.Tensor) -> torch.Tensor:  # images [B, C, S, S] -> [B, D]
    """The RGB model's embedding of images as the data reads them (resized and normalized its way)."""
    return rgb.model.encode_image(rgb.prepare_images(images))


def encode_rendered_back(rgb: Any, image_size: int, backend: str, splats: Splats) -> torch.Tensor:  # [B, D]
    """The RGB model's embedding of splats drawn back to pixels (the render-back control)."""
    return encode_pixels(rgb, rendered_back(splats, image_size, backend))


def image_batches(spec: str, params: Params):
    """An evaluation set's images, read as the fit stage read them."""
    data = params.data
    return image_shard_batches(spec, params.evaluate.batch_size, image_size=data.image_size,
                               resize_mode=data.resize_mode, channels=data.channels)


def score_level(eval_set: EvalSet, level: int, tower: Any, rgb: Any, classifier: torch.Tensor,
                params: Params) -> dict[str, Any]:
    """One level on one set: its tower on the splats, and the RGB model on the splats rendered back."""
    splats = str(params.splat_dir(level, eval_set.split))
    tower_classifier = build_classifier(tower, rgb.tokenizer, eval_set.class_names, eval_set.templates)
    level_scores = evaluate_zero_shot(tower.encode_image, splat_shard_batches(splats, params.evaluate.batch_size),
                                      tower_classifier)
    encode = functools.partial(encode_rendered_back, rgb, params.data.image_size, params.fit.optimizer.backend)
    render_back = evaluate_zero_shot(encode, splat_shard_batches(splats, params.evaluate.batch_size), classifier)
    return {**_level_row(level, params.data), **level_scores, "render_back": _headline(render_back)}


def score_set(eval_set: EvalSet, rgb: Any, towers: dict[int, Any], params: Params, *, progress: bool) -> dict[str, Any]:
    """Every representation on one evaluation set: RGB, each level's tower and render-back, the baselines."""
    data = params.data
    classifier = build_classifier(rgb.model, rgb.tokenizer, eval_set.class_names, eval_set.templates)
    encode = functools.partial(encode_pixels, rgb)
    scores: dict[str, Any] = {"classes": len(eval_set.class_names), "image_shards": eval_set.image_shards}
    scores["rgb"] = evaluate_zero_shot(encode, image_batches(eval_set.image_shards, params), classifier)
    scores["rgb"]["source_bytes"] = source_bytes(data.image_size, data.image_size, data.channels)
    scores["levels"] = {
        level_name(level): score_level(eval_set, level, tower, rgb, classifier, params)
        for level, tower in progress_bar(towers.items(), desc=f"{eval_set.split}: splat levels",
                                         disable=not progress)
    }
    budgets = splat_level_budgets(list(towers), data.channels, params.evaluate.accounting)
    scores["baselines"] = evaluate_matched_bytes(
        encode, functools.partial(image_batches, eval_set.image_shards, params), classifier, budgets,
        list(params.evaluate.baselines),
    )
    return scores


def tower_tokens(rgb: Any, params: Params) -> dict[str, Any]:
    """Tokens and attention FLOPs of both towers at every level."""
    visual = rgb.model.visual
    return {
        level_name(level): token_report(
            rgb_image_size=rgb.image_size,
            patch_size=visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size,
            width=visual.transformer.width,
            layers=visual.transformer.layers,
            num_latents=params.align.encoder.num_latents,
            num_splats=level,
            resampler_layers=params.align.encoder.resampler_layers,
        )
        for level in params.levels()
    }


def evaluate_all(params: Params, *, progress: bool = True) -> dict:
    """Zero-shot top-1/top-5 of the RGB model, every splat level and the baselines, plus tokens.

    Every evaluation set (:func:`evaluation_sets`) is scored the same way and reported under
    ``sets[<split>]``: the RGB model on the images (read as the fit stage read them), each level's
    splat tower on the same images' splats, and the RGB model on the images re-encoded at each
    level's byte budget.
    """
    started = time.perf_counter()
    rgb = create_rgb_clip(params.trained_rgb_model())
    rgb.model.eval()
    towers = {level: load_splat_clip(params.align.tower_path(level), rgb).eval() for level in params.levels()}
    results: dict[str, Any] = {"sets": {}}
    with torch.no_grad():
        for eval_set in evaluation_sets(params):
            results["sets"][eval_set.split] = score_set(eval_set, rgb, towers, params, progress=progress)
    results["tokens"] = tower_tokens(rgb, params)
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


