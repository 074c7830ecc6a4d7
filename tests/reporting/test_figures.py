"""The report figures on small synthetic inputs: they draw, no text falls outside the figure, log
axes read in plain numbers, accuracies carry their intervals, differences are filled or hollow by
their interval, absent methods leave no legend entry, every stage time is written.

Run as a script (``python tests/reporting/test_figures.py [FOLDER]``) to save every figure as a PNG
(default /tmp/figs) and look at them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.text import Text

from gsclip_lib.reporting import figures, paper, splat_figures, zero_shot_figures

LEVELS = {"N22": (22, 2.97), "N11": (11, 5.94), "N6": (6, 10.89), "N3": (3, 21.78)}
SOURCE_BYTES = 784


def _accuracy(top1: float, half: float = 0.03) -> dict:
    return {"top1": top1, "top1_low": top1 - half, "top1_high": top1 + half}


def _relative(value: float, half: float = 0.02) -> dict:
    return {"relative": value, "relative_low": value - half, "relative_high": value + half}


def _baseline(method: str, level: str, top1: float, mean_bytes: float, over: int = 0) -> dict:
    return {"method": method, "level": level, "mean_bytes": mean_bytes, "over_budget_images": over, **_accuracy(top1)}


def scores(methods: tuple[str, ...] = ("jpeg", "thumbnail")) -> dict:
    """One evaluation set's scores as the evaluate stage writes them (the keys the figures read)."""
    levels = {}
    for index, (name, (splats, ratio)) in enumerate(LEVELS.items()):
        top1 = 0.84 - 0.05 * index
        levels[name] = {"splats": splats, "ratio_payload": ratio, "payload_bytes": SOURCE_BYTES / ratio,
                        **_accuracy(top1), **_relative(top1 / 0.85),
                        "render_back": {**_accuracy(top1 - 0.02), **_relative((top1 - 0.02) / 0.85)}}
    baselines = []
    if "jpeg" in methods:
        baselines += [_baseline("jpeg", "N22", 0.80, 420.0, over=950), _baseline("jpeg", "N11", 0.7, 130.0)]
    if "thumbnail" in methods:
        baselines += [_baseline("thumbnail", name, 0.7 - 0.08 * index, SOURCE_BYTES / ratio * 1.05)
                      for index, (name, (_, ratio)) in enumerate(LEVELS.items())]
    return {"classes": 10, "rgb": {**_accuracy(0.85, 0.022), "source_bytes": SOURCE_BYTES, "per_class_top1": [0.8] * 10},
            "levels": levels, "baselines": baselines}


def comparisons(against: tuple[str, ...] = ("rendered back", "thumbnail", "JPEG")) -> list[dict]:
    """Tower-minus-other rows: N22 against the render-back excludes 0 above, against JPEG below."""
    rows = []
    for index, (name, (_, ratio)) in enumerate(LEVELS.items()):
        for which, shift in (("rendered back", 1.5), ("thumbnail", 4.0 + index), ("JPEG", -2.5), ("RGB pixels", -6.0)):
            if which in against:
                difference = shift if index == 0 else shift * 0.3
                rows.append({"level": name, "ratio": ratio, "against": which, "difference": difference,
                             "low": difference - 1.2, "high": difference + 1.2, "verdict": "above"})
    return rows


def photo_table() -> pd.DataFrame:
    rows = []
    for photo in range(3):
        for count, payload in ((3136, 31360), (1600, 16000), (900, 9000), (400, 4000)):
            base = 20 + 4 * math.log(count) + 0.3 * photo
            rows.append({"photo": f"photo {photo}", "splats": count, "steps": 2000, "psnr": base,
                         "psnr_after_codec": base - 0.2,
                         "psnr_pruned_from_larger": math.nan if count == 3136 else base + 0.4 + 0.1 * photo,
                         "psnr_random_init": base - 6 if count == 3136 else math.nan,
                         "payload_bytes": payload, "jpeg_bytes": payload * 0.97, "jpeg_psnr": base - 3})
    return pd.DataFrame(rows)


def psnr_history() -> pd.DataFrame:
    frames = [pd.DataFrame({"iteration": np.arange(0, 200, 10), "seconds": np.arange(20) * 0.01 * count / 400,
                            "psnr": 15 + np.log1p(np.arange(20)) * count / 600, "splats": count})
              for count in (400, 900, 1600, 3136)]
    return pd.concat(frames, ignore_index=True)


def prune_metrics(intervals: bool = True) -> dict:
    levels = {}
    for index, (name, (count, _)) in enumerate(LEVELS.items()):
        psnr = 30 - 3 * index
        row = {"splats": count, "mean_psnr_before": psnr + 2, "mean_psnr": psnr, "mean_psnr_pruned": psnr - 4}
        if intervals:
            row.update(psnr_low=psnr - 0.3, psnr_high=psnr + 0.3)
        levels[name] = {"val": row}
    fit_small = {name: {"pruned": 30 - 3 * i, "fit_small": 29.5 - 3 * i, "steps": 400} for i, name in enumerate(LEVELS)}
    return {"levels": levels, "fit_small": fit_small}


def paired_table() -> pd.DataFrame:
    generator = np.random.default_rng(0)
    frames = []
    for name, shift in (("N11", 0.6), ("N6", 0.05), ("N3", -0.4)):
        direct = generator.normal(25, 2, 1000)
        frames.append(pd.DataFrame({"level": name, "direct_psnr": direct,
                                    "pruned_psnr": direct + shift + generator.normal(0, 1, 1000)}))
    return pd.concat(frames, ignore_index=True)


def relative_rows() -> list[dict]:
    rows = []
    for index, split in enumerate(("eval", "imagenet_val")):
        for level, (_, ratio) in LEVELS.items():
            value = 0.99 - 0.02 * list(LEVELS).index(level) - 0.03 * index
            rows.append({"set": split, "level": level, "ratio": ratio, "relative": value, "low": value - 0.02,
                         "high": value + 0.02, "paper": paper.paper_relative_accuracy(ratio)})
    return rows


CAPTION = "a low resolution photo of a trouser that was photographed for a catalogue"


def samples() -> list:
    images = torch.rand(10, 1, 28, 28)
    return [SimpleNamespace(image=image, caption=CAPTION if index == 0 else f"a photo of a class {index}.")
            for index, image in enumerate(images)]


STAGE_SECONDS = {"prepare": 4.2, "fit": 5400.0, "prune": 610.0, "pretrain": 95.0, "align": 1500.0, "evaluate": 38.0}

FIGURES: dict[str, Callable[[], Figure]] = {
    "psnr_against_size": lambda: figures.plot_psnr_against_size(photo_table()),
    "psnr_history": lambda: figures.plot_psnr_history(psnr_history()),
    "photo_findings": lambda: figures.plot_photo_findings(photo_table()),
    "captioned_samples": lambda: figures.plot_captioned_samples(samples()),
    "zero_shot": lambda: zero_shot_figures.plot_zero_shot_against_ratio(scores(), title="Zero-shot top-1 against compression (eval)"),
    "relative_accuracy": lambda: zero_shot_figures.plot_relative_accuracy(
        scores(), paper.RELATIVE_ZERO_SHOT, title="(c) Relative zero-shot accuracy against compression (eval)"),
    "tower_differences": lambda: zero_shot_figures.plot_tower_differences(comparisons(), title="(d) tower minus the others (eval)"),
    "relative_against_paper": lambda: zero_shot_figures.plot_relative_against_paper(relative_rows()),
    "training_curves": lambda: figures.plot_training_curves(
        {name: [{"step": s, "loss": 3 / (1 + s)} for s in range(50)]
         for name in ("pretrain RGB CLIP", "align stage 1 (distillation from the RGB teacher) N22", "align stage 2 N22",
                      "align N11", "align N6")}),
    "stage_times": lambda: figures.plot_stage_times(STAGE_SECONDS, {"fit N22 (images/s)": 812.5, "fit photos": 3.2}),
    "pruning": lambda: figures.plot_pruning(prune_metrics(), 44, "val"),
    "paired_psnr": lambda: figures.plot_paired_psnr(paired_table(), title="(b) pruned vs fitted directly (eval)"),
    "fit_gallery": lambda: splat_figures.plot_fit_gallery(
        torch.rand(2, 1, 16, 16), {8: torch.rand(2, 1, 16, 16), 4: torch.rand(2, 1, 16, 16)},
        titles=[CAPTION, "short"], psnr_by_count={8: torch.tensor([21.0, 22.0]), 4: torch.tensor([18.0, 19.0])}),
}


def drawn(figure: Figure) -> Figure:
    FigureCanvasAgg(figure).draw()
    return figure


def texts(figure: Figure) -> list[Text]:
    """Every Text a reader sees: visible, not empty, and no label of a tick outside the view (matplotlib
    keeps those but does not draw them)."""
    undrawn = set()
    for axes in figure.axes:
        if not axes.axison:  # axis("off"): neither ticks nor axis labels are drawn
            undrawn |= {id(text) for axis in (axes.xaxis, axes.yaxis) for text in axis.findobj(Text)}
            continue
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-6 * (high - low)
            undrawn |= {id(label) for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                        if not low - slack <= tick.get_loc() <= high + slack for label in (tick.label1, tick.label2)}
    return [text for text in figure.findobj(Text)
            if text.get_visible() and text.get_text().strip() and id(text) not in undrawn]


def legend_labels(figure: Figure) -> list[str]:
    legends = [*figure.legends, *(axis.get_legend() for axis in figure.axes if axis.get_legend())]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


def errorbars(figure: Figure) -> int:
    return sum(isinstance(container, ErrorbarContainer) for axis in figure.axes for container in axis.containers)


@pytest.fixture(scope="module")
def made() -> dict[str, Figure]:
    return {name: drawn(build()) for name, build in FIGURES.items()}


EDGE_CASES: dict[str, Callable[[], Figure]] = {
    "one photo, no random init": lambda: figures.plot_photo_findings(
        photo_table()[lambda t: t.photo == "photo 0"].assign(psnr_random_init=math.nan)),
    "one photo, no pruned fit": lambda: figures.plot_psnr_against_size(
        photo_table()[lambda t: t.photo == "photo 0"].assign(psnr_pruned_from_larger=math.nan)),
    "no baselines": lambda: zero_shot_figures.plot_zero_shot_against_ratio({**scores(), "baselines": []}),
    "no paper value": lambda: zero_shot_figures.plot_relative_against_paper([{**row, "paper": None} for row in relative_rows()]),
    "one level, one representation": lambda: zero_shot_figures.plot_tower_differences(comparisons(("JPEG",))[:1]),
    "stage times alone, one of 0 s": lambda: figures.plot_stage_times({"prepare": 0.0, "fit": 12.0}),
    "no training history": lambda: figures.plot_training_curves({"pretrain": []}),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_draw_inside_the_figure(name: str) -> None:
    figure = drawn(EDGE_CASES[name]())
    renderer, box = figure.canvas.get_renderer(), figure.bbox
    for text in texts(figure):
        extent = text.get_window_extent(renderer)
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1


@pytest.mark.parametrize("name", list(FIGURES))
def test_no_text_outside_the_figure(made: dict[str, Figure], name: str) -> None:
    figure = made[name]
    assert isinstance(figure, Figure)
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    outside = [text.get_text() for text in texts(figure)
               if not (box.x0 - 1 <= (extent := text.get_window_extent(renderer)).x0 and extent.x1 <= box.x1 + 1
                       and box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1)]
    assert not outside, f"{name}: text outside the figure: {outside}"


@pytest.mark.parametrize("name", list(FIGURES))
def test_log_axes_read_in_plain_numbers(made: dict[str, Figure], name: str) -> None:
    for axis in made[name].axes:
        for scale, labels, minor in ((axis.get_xscale(), axis.get_xticklabels(), axis.xaxis.get_minorticklocs()),
                                     (axis.get_yscale(), axis.get_yticklabels(), axis.yaxis.get_minorticklocs())):
            if scale != "log":
                continue
            shown = [label.get_text() for label in labels if label.get_text()]
            assert shown, f"{name}: a log axis without tick labels"
            assert not any(mark in text for text in shown for mark in ("×10", "10^", "$")), shown
            assert len(minor) == 0, f"{name}: minor ticks on a log axis"


def test_log_ticks_sit_at_the_data_values(made: dict[str, Figure]) -> None:
    zero_shot = made["zero_shot"].axes[0]
    labels = [label.get_text().split("\n")[0] for label in zero_shot.get_xticklabels()]
    assert {"3x", "5.9x", "11x", "22x"} <= set(labels)
    pruning = made["pruning"].axes[0]
    assert [label.get_text() for label in pruning.get_xticklabels()] == ["3", "6", "11", "22", "44"]
    by_count = made["psnr_against_size"].axes[0]
    assert [label.get_text() for label in by_count.get_xticklabels()] == ["400", "900", "1,600", "3,136"]


@pytest.mark.parametrize(("name", "least"), [
    ("zero_shot", 4), ("relative_accuracy", 2), ("relative_against_paper", 2), ("tower_differences", 12),
    ("paired_psnr", 3), ("pruning", 1), ("psnr_against_size", 4), ("photo_findings", 4),
])
def test_intervals_are_drawn(made: dict[str, Figure], name: str, least: int) -> None:
    assert errorbars(made[name]) >= least


def test_zero_shot_draws_the_rgb_band_and_hollow_over_budget(made: dict[str, Figure]) -> None:
    figure = made["zero_shot"]
    axis = figure.axes[0]
    assert any(patch.get_alpha() for patch in axis.patches), "no shaded band around the RGB line"
    labels = legend_labels(figure)
    assert "RGB model on JPEG, over budget" in labels and "RGB model on JPEG, same bytes" in labels
    over = next(container for container in axis.containers
                if container.get_label() == "RGB model on JPEG, over budget")
    assert over.lines[0].get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))


def test_pruning_without_intervals_draws_none() -> None:
    assert errorbars(drawn(figures.plot_pruning(prune_metrics(intervals=False), 44, "val"))) == 0


def test_tower_differences_fill_by_interval(made: dict[str, Figure]) -> None:
    lines = {line.get_gid(): line for line in made["tower_differences"].axes[0].lines if line.get_gid()}
    for row in comparisons():
        line = lines[f"{row['level']}|{row['against']}"]
        hollow = line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
        assert hollow == (row["low"] <= 0 <= row["high"]), row
    assert not ({"N22|rendered back", "N22|thumbnail"} - {gid for gid, line in lines.items()
                                                          if line.get_markerfacecolor() != "white"})


def test_absent_methods_leave_no_legend_entry() -> None:
    labels = legend_labels(drawn(zero_shot_figures.plot_tower_differences(comparisons(("rendered back", "thumbnail")))))
    assert "minus rendered back" in labels and "minus thumbnail" in labels
    assert not any("JPEG" in label or "RGB pixels" in label for label in labels)
    labels = legend_labels(drawn(zero_shot_figures.plot_zero_shot_against_ratio(scores(methods=("thumbnail",)))))
    assert not any("JPEG" in label for label in labels)
    assert any("thumbnail" in label for label in labels)


def test_stage_times_write_every_value(made: dict[str, Figure]) -> None:
    figure = made["stage_times"]
    written = {text.get_text() for text in texts(figure)}
    for seconds in STAGE_SECONDS.values():
        assert figures.duration_label(seconds) in written
    axis = figure.axes[0]
    assert axis.get_xscale() == "log"
    assert [label.get_text() for label in axis.get_yticklabels()] == list(STAGE_SECONDS)


def test_psnr_against_size_draws_both_routes(made: dict[str, Figure]) -> None:
    labels = legend_labels(made["psnr_against_size"])
    assert "fitted directly" in labels and "pruned from the next larger fit, refitted" in labels


def test_titles_state_what_is_drawn(made: dict[str, Figure]) -> None:
    titles = [" ".join(axis.get_title().split()) for axis in made["photo_findings"].axes]
    assert "(b) pruned from the next larger fit vs fitted directly, equal steps" in titles
    assert not any("wins" in title or "finds" in title for title in titles)


def test_paired_psnr_interval_and_labels(made: dict[str, Figure]) -> None:
    axis = made["paired_psnr"].axes[0]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["N11 (n=1,000)", "N6 (n=1,000)", "N3 (n=1,000)"]
    table = paired_table()
    difference = (table["pruned_psnr"] - table["direct_psnr"])[table["level"] == "N11"]
    mean, low, high, n = figures.mean_interval(difference)
    assert n == 1000 and high - mean == pytest.approx(1.96 * difference.std() / math.sqrt(1000))
    marker = next(line for line in axis.lines if line.get_gid() == "N11")
    assert marker.get_xdata()[0] == pytest.approx(mean)


def test_captions_are_wrapped_never_cut(made: dict[str, Figure]) -> None:
    for name in ("captioned_samples", "fit_gallery"):
        titles = [" ".join(axis.get_title().split()) for axis in made[name].axes]
        assert CAPTION in titles, name
        assert any("\n" in axis.get_title() for axis in made[name].axes), name


def test_training_curves_take_at_most_four_columns(made: dict[str, Figure]) -> None:
    visible = [axis for axis in made["training_curves"].axes if axis.get_visible()]
    assert len(visible) == 5
    assert max(axis.get_subplotspec().colspan.stop for axis in visible) <= 4


def test_level_examples_render_and_wrap(random_splats) -> None:
    images = torch.rand(2, 1, 16, 16)
    splats = {4: random_splats(2, 4, 1, height=16, width=16), 2: random_splats(2, 2, 1, height=16, width=16, seed=1)}
    figure = drawn(splat_figures.plot_level_examples(images, splats, [CAPTION, "x"], cutoff=3.0, backend="dense"))
    assert CAPTION in [" ".join(axis.get_title().split()) for axis in figure.axes]


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/figs")
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in FIGURES.items():
        figure = build()
        FigureCanvasAgg(figure).print_png(str(folder / f"{name}.png"))
        print(folder / f"{name}.png")
