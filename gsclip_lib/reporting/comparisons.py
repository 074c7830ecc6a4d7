"""The zero-shot results with their uncertainty: intervals, paired tests and the words they allow.

Reads what the evaluate stage wrote for one evaluation set (its scores and the per-image top-1 hits
of every representation, matched by sample key) and gives

- every accuracy's 95 % Wilson interval (:func:`with_intervals`);
- the splat tower of each level against RGB pixels, against its own splats rendered back, and
  against the thumbnail and the JPEG of the same bytes, each a McNemar exact test on the same images
  with a paired 95 % interval of the difference (:func:`level_comparisons`);
- the tower's accuracy relative to RGB with a paired bootstrap interval, set against the paper's
  relative accuracy at the nearest ratio (:func:`relative_rows`);
- the sentences the pages and the README print (:func:`level_sentences`, :func:`conclusions`), whose
  verdict word always follows the test: "above", "below" or "no difference detectable with N images".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gsclip_lib.evaluation.statistics import (
    PairedComparison,
    RatioEstimate,
    accuracy_interval,
    compare_paired,
    compare_to_reference,
    paired_bootstrap_ratio,
)
from gsclip_lib.reporting import paper
from gsclip_lib.reporting.tables import Column, markdown_table

AGAINST = ("RGB pixels", "rendered back", "thumbnail", "JPEG")  # what the tower is compared with
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class LevelComparison:
    """The tower of one level against one other representation, on the same images."""

    level: str  # N22
    ratio: float  # the level's payload compression ratio
    against: str  # one of AGAINST
    test: PairedComparison | None  # None: no same-bytes comparison (the baseline is over budget)
    note: str = ""  # why there is no test

    def as_plot_row(self) -> dict[str, Any]:
        """The row :func:`gsclip_lib.reporting.zero_shot_figures.plot_tower_differences` draws (points)."""
        difference = self.test.difference.as_percent()
        return {"level": self.level, "ratio": self.ratio, "against": self.against,
                "difference": difference.estimate, "low": difference.low, "high": difference.high,
                "verdict": self.test.verdict}


def baseline_column(method: str, level: str) -> str:
    """The per-image table's column of a matched-bytes baseline."""
    return f"{method} {level}"


def _interval_keys(result: dict[str, Any], hits: pd.Series) -> None:
    interval = accuracy_interval(hits.to_numpy())
    result.update(top1_low=interval.low, top1_high=interval.high)


def with_intervals(scores: dict[str, Any], hits: pd.DataFrame, *, seed: int = 0) -> dict[str, Any]:
    """A copy of one set's scores where every accuracy carries ``top1_low``/``top1_high`` (Wilson, 95 %)
    and every level (and its render-back) ``relative``/``relative_low``/``relative_high`` (tower / RGB,
    paired bootstrap, 95 %)."""
    scores = copy.deepcopy(scores)
    _interval_keys(scores["rgb"], hits["rgb"])
    for name, level in scores["levels"].items():
        for result, column in ((level, name), (level["render_back"], f"{name} render_back")):
            _interval_keys(result, hits[column])
            ratio = paired_bootstrap_ratio(hits[column].to_numpy(), hits["rgb"].to_numpy(),
                                           resamples=BOOTSTRAP_RESAMPLES, seed=seed)
            result.update(relative=ratio.estimate, relative_low=ratio.low, relative_high=ratio.high)
    for row in scores.get("baselines", []):
        _interval_keys(row, hits[baseline_column(row["method"], row["level"])])
    return scores


def _baseline_rows(scores: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["method"], row["level"]): row for row in scores.get("baselines", [])}


def level_comparisons(scores: dict[str, Any], hits: pd.DataFrame) -> list[LevelComparison]:
    """Every level's tower against RGB, its render-back, the thumbnail and the JPEG of the same bytes."""
    baselines = _baseline_rows(scores)
    comparisons = []
    for name, level in sorted(scores["levels"].items(), key=lambda item: item[1]["ratio_payload"]):
        tower, ratio = hits[name].to_numpy(), level["ratio_payload"]
        others = {"RGB pixels": "rgb", "rendered back": f"{name} render_back"}
        for against, column in others.items():
            comparisons.append(LevelComparison(name, ratio, against, compare_paired(tower, hits[column].to_numpy())))
        for method, label in (("thumbnail", "thumbnail"), ("jpeg", "JPEG")):
            row = baselines.get((method, name))
            if row is None:
                continue
            if row.get("over_budget_images"):
                note = (f"the {label} cannot meet the {level['payload_bytes']}-byte budget "
                        f"({row['over_budget_images']:,} of {row['images']:,} images over; "
                        f"{row['mean_bytes']:.0f} bytes on average): no same-bytes comparison")
                comparisons.append(LevelComparison(name, ratio, label, None, note))
                continue
            test = compare_paired(tower, hits[baseline_column(method, name)].to_numpy())
            comparisons.append(LevelComparison(name, ratio, label, test))
    return comparisons


def relative_rows(split: str, scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: our relative accuracy with its interval beside the paper's at the nearest ratio, and
    the verdict of the paper's number against our interval. ``scores`` from :func:`with_intervals`."""
    rows = []
    for name, level in sorted(scores["levels"].items(), key=lambda item: item[1]["ratio_payload"]):
        reference = paper.paper_relative_accuracy(level["ratio_payload"])
        verdict = _reference_verdict(level, reference) if reference is not None else None
        rows.append({"set": split, "level": name, "ratio": level["ratio_payload"], "relative": level["relative"],
                     "low": level["relative_low"], "high": level["relative_high"], "paper": reference,
                     "verdict": verdict})
    return rows


def _reference_verdict(level: dict[str, Any], reference: float) -> str:
    estimate = RatioEstimate(level["relative"], level["relative_low"], level["relative_high"],
                             BOOTSTRAP_RESAMPLES, 0)
    return compare_to_reference(estimate, reference)


def percent_with_interval(result: dict[str, Any]) -> str:
    """``82.9 % (95 % CI 80.4-85.1)`` of a result from :func:`with_intervals`."""
    return (f"{100 * result['top1']:.1f} % (95 % CI {100 * result['top1_low']:.1f}–"
            f"{100 * result['top1_high']:.1f})")


def comparison_sentence(comparison: LevelComparison) -> str:
    """``against its splats rendered back: below, -1.5 points (95 % CI ...; McNemar's exact test ...)``."""
    what = {"RGB pixels": "RGB pixels", "rendered back": "its splats rendered back",
            "thumbnail": "the thumbnail of the same bytes", "JPEG": "the JPEG of the same bytes"}[comparison.against]
    if comparison.test is None:
        return f"against {what}: {comparison.note}"
    return f"against {what}: {comparison.test.verdict}, {comparison.test.describe()}"


def relative_sentence(row: dict[str, Any]) -> str:
    """Our relative accuracy with its interval, and where the paper's number falls."""
    text = (f"relative to RGB {row['relative']:.3f} (95 % CI {row['low']:.3f}–{row['high']:.3f}, paired bootstrap "
            f"over images)")
    if row["paper"] is None:
        return text + "; the paper has no level near this ratio"
    where = {"above": "lies below our interval: ours is above it",
             "below": "lies above our interval: ours is below it",
             "no difference detectable": "lies inside our interval: no difference detectable"}[row["verdict"]]
    return text + f"; the paper's {row['paper']:.2f} {where}"


def level_sentences(split: str, scores: dict[str, Any], hits: pd.DataFrame) -> list[str]:
    """One sentence per level of one set: the tower's accuracy, each paired comparison, the paper's."""
    comparisons = level_comparisons(scores, hits)
    relative = {row["level"]: row for row in relative_rows(split, scores)}
    lines = []
    for name, level in sorted(scores["levels"].items(), key=lambda item: item[1]["ratio_payload"]):
        parts = [f"**{split} {name}** ({level['ratio_payload']:.2f}x, {level['payload_bytes']} bytes): the tower "
                 f"scores {percent_with_interval(level)}"]
        parts += [comparison_sentence(item) for item in comparisons if item.level == name]
        parts.append(relative_sentence(relative[name]))
        lines.append("; ".join(parts) + ".")
    return lines


def _levels_by_verdict(items: list[tuple[str, str]]) -> str:
    """``below at N11, N6; no difference detectable with 1,000 images at N22``: levels grouped by verdict."""
    groups: dict[str, list[str]] = {}
    for level, verdict in items:
        groups.setdefault(verdict, []).append(level)
    return "; ".join(f"{verdict} at {', '.join(levels)}" for verdict, levels in groups.items())


def conclusions(split: str, scores: dict[str, Any], hits: pd.DataFrame) -> list[str]:
    """The few sentences that sum up one set, each verdict from its test (see the module docstring)."""
    comparisons = level_comparisons(scores, hits)
    rows = relative_rows(split, scores)
    images = len(hits)
    lines = [
        f"On {images:,} {split} images, the splat tower keeps "
        + ", ".join(f"{row['relative']:.2f} ({row['low']:.2f}–{row['high']:.2f}) at {row['ratio']:.1f}x" for row in rows)
        + " of the RGB model's top-1 (95 % paired-bootstrap intervals); the paper reports "
        + ", ".join(f"{ratio:.2f}x: {value:.2f}" for ratio, value in paper.RELATIVE_ZERO_SHOT.items())
        + " (ViT-B/16, 224x224, mean of 38 sets)."
    ]
    with_paper = [(row["level"], row["verdict"] + (f" with {images:,} images" if row["verdict"].startswith("no") else ""))
                  for row in rows if row["verdict"]]
    if with_paper:
        lines.append("Our relative accuracy against the paper's: " + _levels_by_verdict(with_paper) + ".")
    for against in AGAINST:
        tested = [(item.level, item.test.verdict) for item in comparisons if item.against == against and item.test]
        if tested:
            lines.append(f"The tower against {_against_phrase(against)} (McNemar's exact test, 5 % level): "
                         + _levels_by_verdict(tested) + ".")
        untested = [item.level for item in comparisons if item.against == against and item.test is None]
        if untested:
            lines.append(f"The {against} cannot meet the splats' byte budget at {', '.join(untested)}: "
                         "no same-bytes comparison there.")
    return lines


def _against_phrase(against: str) -> str:
    return {"RGB pixels": "RGB pixels", "rendered back": "its own splats rendered back to pixels",
            "thumbnail": "a thumbnail of the same bytes", "JPEG": "a JPEG of the same bytes"}[against]


def results_frame(split: str, scores: dict[str, Any]) -> pd.DataFrame:
    """One row per representation of one set (``scores`` from :func:`with_intervals`): bytes, ratio,
    top-1 with its interval, top-5."""
    source = scores["rgb"]["source_bytes"]
    rows = [_result_row(split, "RGB pixels", source, 1.0, scores["rgb"])]
    for name, level in scores["levels"].items():
        rows.append(_result_row(split, f"splat tower {name}", level["payload_bytes"], level["ratio_payload"], level))
        rows.append(_result_row(split, f"{name} rendered back, RGB model", level["payload_bytes"],
                                level["ratio_payload"], level["render_back"]))
    for row in scores.get("baselines", []):
        over = f" (over budget: {row['over_budget_images']:,} of {row['images']:,})" if row.get("over_budget_images") else ""
        rows.append(_result_row(split, f"{row['method']} at the {row['level']} budget{over}", row["mean_bytes"],
                                source / row["mean_bytes"], row))
    return pd.DataFrame(rows)


def _result_row(split: str, what: str, size: float, ratio: float, result: dict[str, Any]) -> dict[str, Any]:
    return {"set": split, "representation": what, "bytes": size, "ratio": ratio, "top1": result["top1"],
            "interval": f"{100 * result['top1_low']:.1f}–{100 * result['top1_high']:.1f}", "top5": result["top5"]}


RESULT_COLUMNS = (
    Column("set", "set", "text"),
    Column("representation", "representation", "text"),
    Column("bytes", "bytes per image", "float", 1),
    Column("ratio", "ratio", "float", 2),
    Column("top1", "top-1 %", "percent", 1),
    Column("interval", "top-1 95 % CI", "text"),
    Column("top5", "top-5 %", "percent", 1),
)


def results_markdown(frame: pd.DataFrame) -> str:
    """The results table as Markdown (the README's and the report page's)."""
    return markdown_table(frame, RESULT_COLUMNS)
