"""params.yaml and the typed stage configs mirror each other, and bad values are named."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from gsclip_lib.config import build_config, config_to_dict, load_stage_config
from gsclip_lib.clip_models import RgbModelConfig
from gsclip_lib.clip_stages import AlignStageConfig, EvaluateConfig
from gsclip_lib.data_stages import DataConfig, FitStageConfig, PruneStageConfig
from gsclip_lib.rgb_pretrain import PretrainConfig
from gsclip_lib.fit import FitSettings
from gsclip_lib.paths import PathsConfig
from gsclip_lib.photo_fits import PhotoFitConfig

ROOT = Path(__file__).resolve().parents[1]
# Every group of params.yaml and the dataclass that reads it.
STAGE_CONFIGS = {
    "paths": PathsConfig,
    "fit_photos": PhotoFitConfig,
    "data": DataConfig,
    "fit": FitStageConfig,
    "prune": PruneStageConfig,
    "model": RgbModelConfig,
    "pretrain": PretrainConfig,
    "align": AlignStageConfig,
    "evaluate": EvaluateConfig,
}


def _field_tree(cls) -> dict:
    tree = {}
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        tree[field.name] = _field_tree(type(default)) if dataclasses.is_dataclass(default) else None
    return tree


def _key_tree(values: dict, like: dict) -> dict:
    return {key: (_key_tree(value, like.get(key) or {}) if isinstance(like.get(key), dict) else None) for key, value in values.items()}


@pytest.mark.parametrize("parameter_file", ["params.yaml", "params-tiny.yaml", "params-paper.yaml"])
def test_every_group_has_a_config_with_exactly_its_keys(parameter_file):
    params = yaml.safe_load((ROOT / parameter_file).read_text())
    assert set(params) == set(STAGE_CONFIGS), "a params.yaml group without a config class, or the reverse"
    for group, cls in STAGE_CONFIGS.items():
        fields = _field_tree(cls)
        assert _key_tree(params[group], fields) == fields, f"{group} and {cls.__name__} differ"
        config = load_stage_config(ROOT / parameter_file, group, cls)
        assert config_to_dict(config) == params[group]


def test_unknown_missing_and_mistyped_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) in fit_photos.optimizer: \['iters'\]"):
        build_config(PhotoFitConfig, {"optimizer": {"iters": 3}}, "fit_photos")
    with pytest.raises(ValueError, match="fit_photos.image_size must be an integer"):
        build_config(PhotoFitConfig, {"image_size": "224"}, "fit_photos")
    with pytest.raises(ValueError, match=r"fit_photos.splat_counts\[1\] must be an integer"):
        build_config(PhotoFitConfig, {"splat_counts": [4, 2.5]}, "fit_photos")
    with pytest.raises(ValueError, match="invalid fit_photos.optimizer: unknown init"):
        build_config(PhotoFitConfig, {"optimizer": {"init": "kmeans"}}, "fit_photos")
    with pytest.raises(ValueError, match="unknown photo|photos must name"):
        build_config(PhotoFitConfig, {"photos": ["lena"]}, "fit_photos")


def test_missing_file_and_group_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="parameter file not found"):
        load_stage_config(tmp_path / "nope.yaml", "fit_photos", PhotoFitConfig)
    (tmp_path / "p.yaml").write_text("paths: {reports: r}\n")
    with pytest.raises(ValueError, match="has no group 'fit_photos'"):
        load_stage_config(tmp_path / "p.yaml", "fit_photos", PhotoFitConfig)


def test_integers_are_accepted_for_floats():
    settings = build_config(FitSettings, {"lr_colours": 1, "cutoff": 4}, "opt")
    assert settings.lr_colours == 1.0 and isinstance(settings.cutoff, float)
