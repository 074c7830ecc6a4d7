"""The words about zero-shot results follow their tests: intervals, verdicts, the paper's numbers."""

import numpy as np
import pandas as pd
import pytest

from gsclip_lib.reporting import comparisons

IMAGES = 1000


def _ranked(rng: np.random.Generator, accuracy: float) -> np.ndarray:
    """0/1 hits over the images, exactly ``accuracy`` of them 1, at places drawn from ``rng``."""
    hits = np.zeros(IMAGES, dtype=np.int8)
    hits[rng.permutation(IMAGES)[: int(round(accuracy * IMAGES))]] = 1
    return hits


def _hits(rgb: float, tower: dict[str, float], back: dict[str, float], thumb: dict[str, float], seed: int = 0):
    """Per-image 0/1 hits with exactly the given accuracies, each representation's errors drawn apart."""
    rng = np.random.default_rng(seed)
    columns = {"key": [f"k{i}" for i in range(IMAGES)]}
    columns["rgb"] = _ranked(rng, rgb)
    for level in tower:
        columns[level] = _ranked(rng, tower[level])
        columns[f"{level} render_back"] = _ranked(rng, back[level])
        columns[f"thumbnail {level}"] = _ranked(rng, thumb[level])
    return pd.DataFrame(columns)


def _result(hits: pd.DataFrame, column: str) -> dict:
    return {"top1": float(hits[column].mean()), "top5": 0.99, "images": IMAGES}


def _scores(hits: pd.DataFrame, levels: dict[str, tuple[int, float]]) -> dict:
    scores = {"rgb": {**_result(hits, "rgb"), "source_bytes": 784}, "levels": {}, "baselines": []}
    for name, (splats, ratio) in levels.items():
        scores["levels"][name] = {**_result(hits, name), "splats": splats, "payload_bytes": 12 * splats,
                                  "ratio_payload": ratio, "render_back": _result(hits, f"{name} render_back")}
        scores["baselines"].append({**_result(hits, f"thumbnail {name}"), "method": "thumbnail", "level": name,
                                    "mean_bytes": 12.0 * splats, "over_budget_images": 0})
    scores["baselines"].append({"top1": 0.84, "top5": 0.99, "images": IMAGES, "method": "jpeg", "level": "N3",
                                "mean_bytes": 199.0, "over_budget_images": IMAGES})
    return scores


LEVELS = {"N22": (22, 2.97), "N3": (3, 21.78)}


@pytest.fixture
def case():
    hits = _hits(0.84, {"N22": 0.835, "N3": 0.70}, {"N22": 0.836, "N3": 0.68}, {"N22": 0.83, "N3": 0.50})
    hits["jpeg N3"] = hits["rgb"]
    return comparisons.with_intervals(_scores(hits, LEVELS), hits), hits


def test_every_accuracy_gets_an_interval_and_every_level_a_relative_one(case):
    scores, _ = case
    for result in (scores["rgb"], scores["levels"]["N22"], scores["levels"]["N3"]["render_back"], *scores["baselines"]):
        assert result["top1_low"] < result["top1"] < result["top1_high"]
    level = scores["levels"]["N3"]
    assert level["relative"] == pytest.approx(0.70 / 0.84)
    assert level["relative_low"] < level["relative"] < level["relative_high"]


def test_verdicts_follow_the_paired_tests(case):
    scores, hits = case
    found = {(item.level, item.against): item for item in comparisons.level_comparisons(scores, hits)}
    assert found[("N22", "RGB pixels")].test.verdict == f"no difference detectable with {IMAGES:,} images"
    assert found[("N3", "RGB pixels")].test.verdict == "below"
    assert found[("N3", "thumbnail")].test.verdict == "above"
    assert found[("N3", "JPEG")].test is None and "cannot meet the 36-byte budget" in found[("N3", "JPEG")].note
    sentence = comparisons.comparison_sentence(found[("N3", "RGB pixels")])
    assert sentence.startswith("against RGB pixels: below, -14.0 points (95 % CI") and "McNemar's exact test" in sentence


def test_relative_accuracy_is_set_against_the_papers(case):
    scores, hits = case
    rows = {row["level"]: row for row in comparisons.relative_rows("eval", scores)}
    assert rows["N22"]["paper"] == 0.98 and rows["N22"]["verdict"] == "no difference detectable"
    assert rows["N3"]["paper"] == 0.91 and rows["N3"]["verdict"] == "below"
    assert "the paper's 0.91 lies above our interval: ours is below it" in comparisons.relative_sentence(rows["N3"])


def test_conclusions_and_table_come_from_the_numbers(case):
    scores, hits = case
    lines = comparisons.conclusions("eval", scores, hits)
    assert lines[0].startswith(f"On {IMAGES:,} eval images, the splat tower keeps 0.99 (0.9")
    assert ("Our relative accuracy against the paper's: no difference detectable with 1,000 images at N22; "
            "below at N3.") in lines
    assert any(line.startswith("The tower against a thumbnail of the same bytes") and "above at N3" in line
               for line in lines)
    assert any("JPEG cannot meet the splats' byte budget at N3" in line for line in lines)
    table = comparisons.results_markdown(comparisons.results_frame("eval", scores))
    assert "| eval | splat tower N3 | 36.0 | 21.78 | 70.0 |" in table
    assert "nan" not in table.lower() and table.count("\n") == 2 + 1 + 2 * 2 + 3
