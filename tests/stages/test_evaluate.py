"""Which evaluation sets a run scores, and with which class names and prompts."""

import pytest

from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.errors import ConfigError, InputError
from gsclip_lib.stages.evaluate import class_names_and_templates, evaluation_sets


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
