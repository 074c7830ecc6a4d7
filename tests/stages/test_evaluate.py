"""Which evaluation sets a run scores, with which class names and prompts; render-back; the per-image table."""

import pytest

from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.captions import OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.errors import ConfigError, InputError
from gsclip_lib.splats.container import Splats
from gsclip_lib.stages.evaluate import (
    evaluation_sets,
    per_image_table,
    rendered_back,
)


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


def test_rendered_back_is_an_image_in_the_unit_range(random_splats):
    splats = random_splats(2, 6, height=12, width=12, beyond=0.0)
    splats = Splats.from_tensors(splats.positions, splats.cholesky, splats.colours * 5)  # too bright: clamped
    image = rendered_back(splats, 12, backend="windowed")
    assert image.shape == (2, 1, 12, 12)
    assert float(image.min()) >= 0.0 and float(image.max()) == 1.0


def test_per_image_table_pairs_images_by_key_and_counts_the_unpaired():
    scores = {
        "rgb": {"top1": 0.5, "keys": ["a", "b", "c"], "correct_top1": [1, 0, 1]},
        "levels": {"N22": {"top1": 1.0, "keys": ["b", "a"], "correct_top1": [1, 1],  # c's fit was dropped
                           "render_back": {"top1": 0.5, "keys": ["a", "b"], "correct_top1": [0, 1]}}},
        "baselines": [{"method": "jpeg", "level": "N22", "keys": ["a", "b", "c"], "correct_top1": [1, 1, 0]}],
    }
    table = per_image_table(scores)
    assert list(table.columns) == ["key", "rgb", "N22", "N22 render_back", "jpeg N22"]
    assert table.set_index("key").loc["a"].tolist() == [1, 1, 0, 1]
    assert scores["paired_images"] == 2 and scores["unpaired"] == 1
    assert "keys" not in scores["rgb"] and "correct_top1" not in scores["levels"]["N22"]["render_back"]
    scores["rgb"].update(keys=None, correct_top1=[1])
    with pytest.raises(InputError, match="no sample keys"):
        per_image_table(scores)
