"""``gsclip classify``: zero-shot classes of ``.gsplat`` files, read from their bytes by a level's splat tower.

The records are decoded to splats and read by the tower of a trained level (``--model``, e.g.
``data/models/align/N22``) on the trained RGB model; no pixel is drawn. The class prompts are the
evaluate stage's (:func:`gsclip_lib.evaluation.class_prompts.class_names_and_templates`), the
classifier its own (:func:`gsclip_lib.evaluation.zero_shot.build_classifier`). Probabilities are the
softmax over all classes at the tower's learned temperature. Every file is read and its record
checked (magic, version, lengths, checksum) before the model loads; its size and channels against
the tower's after. One CPU thread by default: the tower is small, and on two cores a thread pool spent
more time waking its threads than computing (0.55 s for one record against 4 ms on one thread, with
the other core busy). The classifier is built once per level, vocabulary and model files and then
loaded from the user's cache (:mod:`gsclip_lib.evaluation.cached_classifier`; ``--no-cache`` to
bypass it), which saves importing open_clip: most of a one-file call's time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

from gsclip_lib import api
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import compression_ratio, source_bytes


def add_parsers(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = commands.add_parser("classify", help="zero-shot top-K classes of .gsplat files, from their bytes")
    parser.add_argument("files", nargs="+", metavar="FILE.gsplat")
    parser.add_argument("--model", required=True, help="a trained level's folder, e.g. data/models/align/N22")
    parser.add_argument("--classes", default="fashion_mnist",
                        help="fashion_mnist, imagenet, or a file of class names, one per line in label order")
    parser.add_argument("--top", type=int, default=5, help="classes listed per file (default 5)")
    parser.add_argument("--rgb", default=None, help="the trained RGB model (default: pretrain.checkpoint_dir/model.pt)")
    parser.add_argument("--batch-size", type=int, default=None, help="records per batch (default: evaluate.batch_size)")
    parser.add_argument("--no-cache", action="store_true",
                        help="build the classifier from the models, neither reading nor writing the classifier cache")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the tower is small; 0: torch's default, every core)")
    add_common(parser)
    parser.set_defaults(run=run_classify, text=classify_text)


def run_classify(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    records = [api.read_record(path) for path in args.files]
    params, _ = api.read_params(args.params)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    read_seconds = time.perf_counter() - started
    classifier = api.load_classifier(args.model, args.classes, params=args.params, rgb_checkpoint=args.rgb,
                                     cache=not args.no_cache)
    loaded = time.perf_counter()
    predictions = api.classify(records, classifier, top=args.top, batch_size=args.batch_size or params.evaluate.batch_size,
                               names=args.files)
    seconds = time.perf_counter() - loaded
    rows = []
    for path, record, prediction in zip(args.files, records, predictions):
        decoded = api.decode(record, name=path)
        source = source_bytes(decoded.height, decoded.width, decoded.channels)
        rows.append({"file": path, "bytes": len(record), "ratio": round(compression_ratio(source, len(record)), 4),
                     "top": [{"label": label, "class": name, "probability": round(probability, 5)}
                             for label, name, probability in zip(prediction.labels, prediction.names,
                                                                  prediction.probabilities)]})
    return {"model": str(args.model), "classes": args.classes, "num_classes": len(classifier.class_names),
            "files": rows, "classifier_cached": classifier.cached, "read_seconds": round(read_seconds, 4),
            "load_seconds": round(loaded - started - read_seconds, 4), "classify_seconds": round(seconds, 4),
            "seconds_per_image": round(seconds / len(records), 6), "images_per_second": round(len(records) / seconds, 1)
            if seconds > 0 else None}


def classify_text(r: dict[str, Any]) -> str:
    lines = []
    for row in r["files"]:
        best = ", ".join(f"{item['class']} {100 * item['probability']:.1f} %" for item in row["top"])
        lines.append(f"{row['file']} ({row['bytes']} bytes, {row['ratio']:.2f}x): {best}")
    source = "from the classifier cache" if r["classifier_cached"] else "built from the models"
    lines.append(f"{len(r['files'])} file(s) by the tower in {r['model']}: model {source} in {r['load_seconds']:.2f} s, "
                 f"{1000 * r['seconds_per_image']:.2f} ms per image")
    return "\n".join(lines)
