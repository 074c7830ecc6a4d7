"""Which evaluation sets a run scores, and with which class names and prompts."""

import pytest

from gsclip_lib.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.clip_stages import EvaluateConfig, class_names_and_templates, evaluation_sets
from gsclip_lib.data_stages import DataConfig, FitStageConfig
from gsclip_lib.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.reporting import write_json


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
    with pytest.raises(ValueError, match="one class name per line"):
        class_names_and_templates(str(path))
    with pytest.raises(FileNotFoundError, match="neither fashion_mnist nor imagenet"):
        class_names_and_templates(str(tmp_path / "missing.txt"))


def test_evaluation_sets_follow_the_fitted_splits(tmp_path):
    data = DataConfig(shards_dir=str(tmp_path))
    fit = FitStageConfig()
    sets = evaluation_sets(data, fit, EvaluateConfig())
    assert [s.split for s in sets] == ["eval"] and sets[0].image_shards == fit.eval_shards

    folder = DataConfig(shards_dir=str(tmp_path), imagenet_dir=str(tmp_path / "val"))
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        evaluation_sets(folder, fit, EvaluateConfig())
    write_json(folder.imagenet_classes_file(), {"root": "val", "class_names": ["goldfish", "tench"]})
    sets = evaluation_sets(folder, FitStageConfig(eval_shards=""), EvaluateConfig())
    assert [s.split for s in sets] == ["imagenet"]
    assert sets[0].class_names == ("goldfish", "tench") and sets[0].templates == tuple(OPENAI_IMAGENET_TEMPLATES)
    assert sets[0].image_shards == folder.imagenet_shards()

    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluation_sets(data, FitStageConfig(eval_shards=""), EvaluateConfig())


def test_invalid_evaluate_settings_are_named():
    with pytest.raises(ValueError, match="evaluate.accounting"):
        EvaluateConfig(accounting="bytes")
    with pytest.raises(ValueError, match="evaluate.baselines"):
        EvaluateConfig(baselines=("png",))
    with pytest.raises(ValueError, match="data.imagenet_class_names"):
        DataConfig(imagenet_class_names="names.txt")
