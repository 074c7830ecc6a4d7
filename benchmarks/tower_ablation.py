"""Ablation of the splat tower's recipe at one level (METHOD.md section 2; README "Benchmarks").

``python -m benchmarks.tower_ablation [--level 22] [--variants a,b] [--out benchmarks/tower_ablation.json]``

After ``make repro``, each variant (:data:`VARIANTS`: ``params.yaml`` with a few ``--set``
overrides) is aligned exactly as the ``align@N`` stage aligns (its own checkpoint folder under
``data/ablation/``) and scored zero-shot on the level's eval splats as ``evaluate`` scores it. The
JSON holds per variant its overrides, top-1 / top-5, top-1 relative to RGB, the final losses and CPU
seconds, beside the RGB model's top-1 on pixels and on the splats rendered back; it is saved after
every variant, so a long run can be continued with ``--variants``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import command_line, machine_info
from gsclip_lib.atomic_files import write_json
from gsclip_lib.evaluation.zero_shot import build_classifier, evaluate_zero_shot, image_shard_batches, splat_shard_batches
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.models.splat_clip import load_splat_clip
from gsclip_lib.params import Params, load_params
from gsclip_lib.stages.align import align_level
from gsclip_lib.stages.evaluate import evaluation_sets, rendered_back

# name -> (what it changes, overrides of params.yaml). "default" is params.yaml as it stands.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("params.yaml: grid latents, locality bias, teacher ln_pre, token distillation 6 + 2 epochs", []),
    "previous_default": (
        "the recipe before: learned latents, RMSNorm, 4 resampler layers, embedding distillation, 1 + 3 epochs of batch 256",
        [
            "align.encoder.latents=learned", "align.encoder.locality_width=0", "align.encoder.norm_pre=rms",
            "align.encoder.resampler_layers=4", "align.distill_target=embedding",
            "align.distill.epochs=1", "align.distill.batch_size=256", "align.distill.lr=0.001",
            "align.contrastive.epochs=3", "align.contrastive.batch_size=256",
        ],
    ),
    "embedding_distillation": (
        "distil the final embedding instead of the block inputs (same stem and epochs)",
        ["align.distill_target=embedding"],
    ),
    "no_locality_bias": ("no Gaussian locality bias in the cross-attention", ["align.encoder.locality_width=0"]),
    "rms_norm_pre": ("RMSNorm before the blocks instead of a copy of the RGB ln_pre", ["align.encoder.norm_pre=rms"]),
    "unfreeze_two_blocks": ("train copies of the first two RGB blocks (paper v2)", ["align.encoder.unfreeze_first_blocks=2"]),
    "half_the_epochs": (
        "half the distillation (3 epochs) and one contrastive epoch: the cost of a faster run",
        ["align.distill.epochs=3", "align.contrastive.epochs=1"],
    ),
}


def variant_params(params_path: str | Path, overrides: list[str], checkpoint_dir: Path) -> Params:
    """``params.yaml`` with a variant's overrides and its own checkpoint folder."""
    return load_params(params_path, overrides=[*overrides, f"align.checkpoint_dir={checkpoint_dir}"])


def eval_split(params: Params) -> Any:
    sets = [s for s in evaluation_sets(params) if s.split == "eval"]
    if not sets:
        raise SystemExit("the ablation scores data.eval_shards: this run has none")
    return sets[0]


def score_tower(params: Params, rgb: Any, tower_path: Path, level: int) -> dict[str, Any]:
    """Zero-shot top-1 / top-5 of a saved splat tower on the level's eval splats (as evaluate does)."""
    eval_set = eval_split(params)
    tower = load_splat_clip(tower_path, rgb).eval()
    with torch.no_grad():
        classifier = build_classifier(tower, rgb.tokenizer, eval_set.class_names, eval_set.templates)
        scores = evaluate_zero_shot(
            tower.encode_image, splat_shard_batches(str(params.splat_dir(level, "eval")), params.evaluate.batch_size),
            classifier,
        )
    return {key: scores[key] for key in ("top1", "top5", "images")}


def score_rgb(params: Params, level: int) -> dict[str, float]:
    """The RGB model's top-1 on the eval pixels and on the level's eval splats rendered back."""
    rgb = create_rgb_clip(params.trained_rgb_model())
    rgb.model.eval()
    eval_set = eval_split(params)
    data = params.data

    def encode(images: torch.Tensor) -> torch.Tensor:
        return rgb.model.encode_image(rgb.prepare_images(images))

    with torch.no_grad():
        classifier = build_classifier(rgb.model, rgb.tokenizer, eval_set.class_names, eval_set.templates)
        pixels = evaluate_zero_shot(
            encode, image_shard_batches(eval_set.image_shards, params.evaluate.batch_size, image_size=data.image_size,
                                        resize_mode=data.resize_mode, channels=data.channels), classifier,
        )
        back = evaluate_zero_shot(
            lambda splats: encode(rendered_back(splats, data.image_size, params.fit.optimizer.backend)),
            splat_shard_batches(str(params.splat_dir(level, "eval")), params.evaluate.batch_size), classifier,
        )
    return {"rgb_top1": pixels["top1"], "render_back_top1": back["top1"]}


def run_variant(params_path: str | Path, name: str, level: int, work_dir: Path, progress: bool) -> dict[str, Any]:
    description, overrides = VARIANTS[name]
    folder = work_dir / name
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resume of an older one
    params = variant_params(params_path, overrides, folder)
    rgb = create_rgb_clip(params.trained_rgb_model())
    started, cpu_started = time.perf_counter(), time.process_time()
    result = align_level(rgb, str(params.splat_dir(level, "train")), params.align, params.data,
                         progress=progress, level=level)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    scores = score_tower(params, rgb, result.path, level)
    metrics = result.metrics
    return {
        "description": description,
        "overrides": overrides,
        **scores,
        "distill_final": metrics["distill"]["final"],
        "contrastive_final": metrics["contrastive"]["final"],
        "align_seconds": round(seconds, 1),
        "align_cpu_seconds": round(cpu_seconds, 1),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The variants as a Markdown table, best first, with top-1 relative to RGB and to render-back."""
    rgb, back = report["rgb_top1"], report["render_back_top1"]
    lines = [
        f"| variant (N{report['level']}) | what changes | top-1 | / RGB | vs render-back | align CPU s |",
        "|---|---|---|---|---|---|",
    ]
    rows = sorted(report["variants"].items(), key=lambda item: -item[1]["top1"])
    for name, row in rows:
        lines.append(
            f"| {name} | {row['description']} | {100 * row['top1']:.1f} % | {row['top1'] / rgb:.3f} | "
            f"{100 * (row['top1'] - back):+.1f} | {row['align_cpu_seconds']:.0f} |"
        )
    lines.append(f"| (RGB on pixels) | | {100 * rgb:.1f} % | 1.000 | | |")
    lines.append(f"| (RGB on the splats rendered back) | | {100 * back:.1f} % | {back / rgb:.3f} | 0.0 | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--level", type=int, default=None, help="splat count (default: the fitted level)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="benchmarks/tower_ablation.json")
    parser.add_argument("--work-dir", default="data/ablation", help="checkpoint folders of the variants")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    params = load_params(args.params)
    level = args.level if args.level is not None else params.fit.num_splats
    if level not in params.levels():
        parser.error(f"--level {level} is none of the pipeline's levels {params.levels()}")
    for needed in (params.pretrain.model_path(), params.splat_dir(level, "train"), params.splat_dir(level, "eval")):
        if not Path(needed).exists():
            raise SystemExit(f"{needed} is missing: run the default pipeline first (make repro)")
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if report.get("level") != level:
        report = {}
    report.update({"level": level, "variants": report.get("variants", {})})
    report.update(score_rgb(params, level))
    for name in names:
        print(f"variant {name}: {VARIANTS[name][0]}", flush=True)
        report["variants"][name] = run_variant(args.params, name, level, Path(args.work_dir), not args.no_progress)
        row = report["variants"][name]
        print(f"variant {name}: top-1 {100 * row['top1']:.1f} % in {row['align_cpu_seconds']:.0f} CPU s", flush=True)
        for stale in ("git_commit", "date"):  # files written before the harness kept these at the top
            report.pop(stale, None)
        report["machine"] = machine_info()  # with the date and the commit (machine.git)
        report["command"] = command_line("benchmarks.tower_ablation", argv)
        write_json(out, report)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
