"""Which evaluation sets a run scores, with which class names and prompts; render-back and the findings."""

import pytest

from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.errors import ConfigError, InputError
from gsclip_lib.reporting import figures, paper
from gsclip_lib.splats.container import Splats
from gsclip_lib.stages.evaluate import (
    accuracy_table,
    class_names_and_templates,
    comparison_rows,
    evaluation_sets,
    findings,
    rendered_back,
)


def test_class_name_sources():
    names, templates = class_names_and_templates("fashion_mnist")
    assert names == tuple(FASHION_MNIST_CLASSES) and templates == tuple(FASHION_MNIST_EVAL_TEMPLATES)
    names, templates = class_names_and_templates("imagenet")
    assert len(names) == 1000 and names == tuple(IMAGENET_CLASSNAMES)
    assert templates == tuple(OPENAI_IMAGENET_TEMPLATES)


def test_class_names_from_a_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("cat\ndog\n\n")
    assert class_names_and_templates(str(path))[0] == ("cat", "dog")
    path.write_text("cat\n\ndog\n")
    with pytest.raises(InputError, match="one class name per line"):
        class_names_and_templates(str(path))
    with pytest.raises(InputError, match="neither fashion_mnist nor imagenet"):
        class_names_and_templates(str(tmp_path / "missing.txt"))


def test_evaluation_sets_follow_the_fitted_splits(tmp_path, defaults):
    params = defaults.params(f"data.shards_dir={tmp_path}")
    sets = evaluation_sets(params)
    assert [s.split for s in sets] == ["eval"] and sets[0].image_shards == params.data.eval_spec()

    folder = defaults.params(f"data.shards_dir={tmp_path}", f"data.imagenet_dir={tmp_path}/val")
    with pytest.raises(InputError, match="run the prepare stage"):
        evaluation_sets(folder)
    write_json(folder.data.imagenet_classes_file(), {"root": "val", "class_names": ["goldfish", "tench"]})
    only_folder = defaults.params(f"data.shards_dir={tmp_path}", f"data.imagenet_dir={tmp_path}/val",
                                  "data.eval_shards=none")
    sets = evaluation_sets(only_folder)
    assert [s.split for s in sets] == ["imagenet"]
    assert sets[0].class_names == ("goldfish", "tench") and sets[0].templates == tuple(OPENAI_IMAGENET_TEMPLATES)
    assert sets[0].image_shards == folder.data.imagenet_shards()

    with pytest.raises(ConfigError, match="nothing to evaluate"):
        defaults.params(f"data.shards_dir={tmp_path}", "data.eval_shards=none")


def test_invalid_evaluate_settings_are_named(defaults):
    with pytest.raises(ConfigError, match="evaluate.accounting"):
        defaults.params("evaluate.accounting=bytes")
    with pytest.raises(ConfigError, match=r"evaluate.baselines.0"):
        defaults.params("evaluate.baselines=[png]")
    with pytest.raises(ConfigError, match="imagenet_class_names is set but imagenet_dir is empty"):
        defaults.params("data.imagenet_class_names=names.txt")


def _scores() -> dict:
    """One evaluation set's scores, as the evaluate stage writes them, with made-up numbers."""
    def level(splats, ratio, top1, back):
        return {"splats": splats, "payload_bytes": 12 * splats, "ratio_payload": ratio, "top1": top1, "top5": 0.99,
                "render_back": {"top1": back, "top5": 0.99, "images": 100, "skipped": 0, "per_class_top1": []}}

    return {
        "classes": 10,
        "rgb": {"top1": 0.80, "top5": 0.99, "source_bytes": 784, "per_class_top1": [0.8] * 10},
        "levels": {"N22": level(22, 2.97, 0.78, 0.80), "N3": level(3, 21.78, 0.52, 0.40)},
        "baselines": [
            {"method": "thumbnail", "level": "N22", "top1": 0.75, "top5": 0.99, "mean_bytes": 260.0},
            {"method": "thumbnail", "level": "N3", "top1": 0.55, "top5": 0.99, "mean_bytes": 36.0},
            {"method": "jpeg", "level": "N3", "top1": 0.79, "top5": 0.99, "mean_bytes": 199.2, "over_budget_images": 100},
        ],
    }


def test_findings_name_the_gaps_in_words():
    first, second = findings(_scores(), "eval")
    assert first.startswith("**eval N22** (3.0x): tower 78.0 %")
    assert "below its splats rendered back (80.0 %, -2.0 points)" in first
    assert "beats the thumbnail of the same bytes by 3.0 points" in first
    assert "relative accuracy 0.97, in line with the paper's 0.98" in first
    assert "at or above its splats rendered back (40.0 %, +12.0 points)" in second
    assert "loses to the thumbnail of the same bytes by 3.0 points" in second
    assert "the jpeg cannot fit the budget (it needs 199 bytes on average) and scores 79.0 %" in second
    assert "relative accuracy 0.65 against the paper's 0.91: below it; its splats rendered back hold no more" in second


def test_render_back_reaches_the_table_and_the_figures():
    scores = _scores()
    table = accuracy_table({"sets": {"eval": scores}})
    backs = table[table.representation.str.contains("rendered back")]
    assert list(backs.top1) == [80.0, 40.0]
    rows = comparison_rows(scores, "eval")
    assert [row["ours"] for row in rows if "rendered back" in row["what"]] == [1.0, 0.5]
    relative = figures.plot_relative_accuracy(scores, paper.RELATIVE_ZERO_SHOT)
    labels = [line.get_label() for line in relative.axes[0].get_lines()]
    assert "ours: RGB model on the splats rendered back" in labels and any(label.startswith("paper") for label in labels)
    bars = figures.plot_tower_against_render_back(scores)
    assert len(bars.axes[0].containers) == 3  # tower, render-back, thumbnail (JPEG at N3 only: no series)
    ratio = figures.plot_zero_shot_against_ratio(scores)
    assert "RGB on the splats rendered back" in [line.get_label() for line in ratio.axes[0].get_lines()]


def test_rendered_back_is_an_image_in_the_unit_range(random_splats):
    splats = random_splats(2, 6, height=12, width=12, beyond=0.0)
    splats = Splats.from_tensors(splats.positions, splats.cholesky, splats.colours * 5)  # too bright: clamped
    image = rendered_back(splats, 12, backend="windowed")
    assert image.shape == (2, 1, 12, 12)
    assert float(image.min()) >= 0.0 and float(image.max()) == 1.0
