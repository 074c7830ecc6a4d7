"""params.yaml, the typed configs and the profiles agree; bad values are named, never defaulted."""

import math
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from gsclip_lib.config import compose, flatten, parse_override, read_yaml
from gsclip_lib.errors import ConfigError
from gsclip_lib.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def _schema_keys(model: type[BaseModel], where: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        path = f"{where}.{name}" if where else name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _schema_keys(annotation, path)
        else:
            keys.add(path)
    return keys


def test_params_yaml_and_the_schema_have_the_same_keys():
    assert set(flatten(read_yaml(ROOT / "params.yaml"))) == _schema_keys(Params)


def test_the_schema_holds_no_default_value():
    def defaults(model: type[BaseModel], where: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if not field.is_required():
                found.append(f"{where}{name}")
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found += defaults(field.annotation, f"{where}{name}.")
        return found

    assert defaults(Params) == [], "params.yaml is the only source of values"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda path: path.stem)
def test_a_profile_changes_only_what_it_declares(profile):
    base = flatten(read_yaml(ROOT / "params.yaml"))
    declared = flatten(read_yaml(profile))
    merged = flatten(compose(ROOT / "params.yaml", profile))
    changed = {key for key in base if merged[key] != base[key]}
    assert changed <= set(declared), f"{profile.name} changes keys it does not declare: {changed - set(declared)}"
    unchanged = sorted(key for key in declared if merged[key] == base[key])
    assert not unchanged, f"{profile.name} repeats params.yaml's values for {unchanged}: keep only what differs"
    load_params(ROOT / "params.yaml", profile=profile)  # and the result is valid


def test_the_tiny_profile_changes_sizes_only():
    declared = flatten(read_yaml(ROOT / "profiles" / "tiny.yaml"))
    choices = [key for key in declared if key.startswith(("model.", "align.encoder.")) or
               key.rsplit(".", 1)[-1] in ("lr", "lr_positions", "lr_cholesky", "lr_colours", "init", "weight_decay")]
    assert not choices, f"the tiny profile must run the default model and settings, but changes {choices}"


def test_a_profile_key_unknown_to_params_yaml_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("fit:\n  optimiser:\n    iterations: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key fit.optimiser"):
        load_params(ROOT / "params.yaml", profile=tmp_path / "bad.yaml")


def _params_without(tmp_path, *path: str) -> Path:
    values = read_yaml(ROOT / "params.yaml")
    holder = values
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    return tmp_path / "params.yaml"


@pytest.mark.parametrize("path", [("fit", "num_splats"), ("fit", "optimizer"), ("data", "seed"), ("evaluate",)])
def test_a_missing_key_is_an_error_naming_it(tmp_path, path):
    with pytest.raises(ConfigError, match=rf"missing key {'.'.join(path)}\b"):
        load_params(_params_without(tmp_path, *path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("fit.optimizer.colour_l1=.nan", "fit.optimizer.colour_l1: Input should be a finite number"),
        ("fit.optimizer.lr_positions=.inf", "fit.optimizer.lr_positions: Input should be a finite number"),
        ("fit.optimizer.lr_positions=0", "fit.optimizer.lr_positions: Input should be greater than 0"),
        ("data.seed=-1", "data.seed: Input should be greater than or equal to 0"),
        ("fit.num_splats='22'", "fit.num_splats: Input should be a valid integer"),
        ("align.cache_text_embeddings=1", "align.cache_text_embeddings: Input should be a valid boolean"),
        ("fit.optimizer.init=kmeans", "fit.optimizer.init: Input should be 'grid', 'gradient' or 'random'"),
        ("data.channels=2", "data.channels: Input should be 1 or 3"),
        ("prune.levels=[11,11]", "levels must be distinct positive counts"),
        ("prune.levels=[22]", "prune.levels [22] must lie below fit.num_splats = 22"),
        ("fit.num_splats=900", "more than the 784 pixels of data.image_size = 28"),
        ("fit.out_dir=data/shards/splats", "fit.out_dir (data/shards/splats) lies inside data.shards_dir"),
        ("fit.iterations=3", "unknown key fit.iterations"),
    ],
)
def test_invalid_values_are_named(override, message):
    with pytest.raises(ConfigError) as caught:
        load_params(ROOT / "params.yaml", overrides=[override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_overrides_read_values_as_yaml():
    assert parse_override("prune.levels=[11, 6]") == {"prune": {"levels": [11, 6]}}
    assert parse_override("a.b.c=1e-3") == {"a": {"b": {"c": 1e-3}}}
    params = load_params(ROOT / "params.yaml", overrides=["fit.optimizer.iterations=150", "prune.levels=[12, 5]"])
    assert params.fit.optimizer.iterations == 150 and params.levels() == [22, 12, 5]
    with pytest.raises(ConfigError, match="must look like group.key=value"):
        parse_override("fit.iterations")


def test_integers_are_accepted_for_floats_and_replace_validates(defaults):
    settings = defaults.fit_settings(lr_colours=1, cutoff=4)
    assert settings.lr_colours == 1.0 and isinstance(settings.cutoff, float) and math.isfinite(settings.cutoff)
    with pytest.raises(ConfigError, match="iterations: Input should be greater than or equal to 0"):
        defaults.fit_settings(iterations=-1)


def test_shard_paths_follow_the_shards_folder(defaults):
    params = defaults.params("data.shards_dir=elsewhere")
    assert params.data.train_spec() == "elsewhere/train-*.tar" and params.data.eval_spec() == "elsewhere/eval-*.tar"
    assert params.splat_splits() == {"train": "elsewhere/train-*.tar", "eval": "elsewhere/eval-*.tar"}
    external = defaults.params("data.train_shards=/datacomp/{0000..0009}.tar", "data.eval_shards=none",
                               "data.imagenet_dir=/val")
    assert external.splat_splits() == {"train": "/datacomp/{0000..0009}.tar", "imagenet": "data/shards/imagenet-*.tar"}
