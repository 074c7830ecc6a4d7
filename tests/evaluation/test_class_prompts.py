"""The classes a zero-shot classifier chooses among: named sources, class files, an image folder's names."""

import pytest

from gsclip_lib.data.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.errors import InputError
from gsclip_lib.evaluation.class_prompts import class_names_and_templates, folder_class_names, save_folder_class_names


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


def test_folder_class_names_round_trip(tmp_path):
    path = tmp_path / "classes.json"
    with pytest.raises(InputError, match="run the prepare stage"):
        folder_class_names(path)
    save_folder_class_names(path, tmp_path, ["tench", "goldfish"])
    assert folder_class_names(path) == ("tench", "goldfish")
