"""``gsclip`` agrees with the pipeline on the tiny profile: ``gsclip encode`` of the eval images at the
fit stage's settings writes the fit stage's bytes, and ``gsclip classify`` of those bytes gives the
evaluate stage's top-1 on every image (benchmarks/command.py checks the default run's 1,000 images)."""

import json

import pytest

from gsclip_lib.data.splat_shards import splat_dataset


def stage_records(folder) -> dict[str, bytes]:
    return {sample.key: sample.record for sample in splat_dataset(str(folder), rank=0, world_size=1)}


@pytest.fixture(scope="module")
def fitted(tiny_project) -> dict[str, bytes]:
    """The fit stage's records of the tiny eval split, by key."""
    params = tiny_project.params
    return stage_records(params.splat_dir(params.fit.num_splats, "eval"))


def evaluate_stage_hits(project) -> dict[str, int]:
    """The evaluate stage's per-image top-1 hits of the N22 tower (its own scoring function)."""
    from gsclip_lib.evaluation.class_prompts import class_names_and_templates
    from gsclip_lib.evaluation.zero_shot import build_classifier
    from gsclip_lib.models.rgb_clip import create_rgb_clip
    from gsclip_lib.models.splat_clip import load_splat_clip
    from gsclip_lib.stages.evaluate import EvalSet, score_level

    params = project.params
    level = params.fit.num_splats
    rgb = create_rgb_clip(params.trained_rgb_model(), device="cpu")
    tower = load_splat_clip(params.align.tower_path(level), rgb).eval()
    names, templates = class_names_and_templates(params.evaluate.eval_classes)
    eval_set = EvalSet("eval", params.data.eval_spec(), names, templates)
    classifier = build_classifier(rgb.model, rgb.tokenizer, names, templates)
    scores = score_level(eval_set, level, tower, rgb, classifier, params)
    return dict(zip(scores["keys"], scores["correct_top1"]))


def test_encoding_a_folder_writes_the_fit_stages_bytes(tiny_project, fitted, gsclip, tmp_path):
    status, out, err = gsclip("encode", tiny_project.eval_pngs, "--splats", 22, "-o", tmp_path / "shards",
                                  "--params", tiny_project.params_path, "--json")
    assert status == 0, err
    assert json.loads(out)["total"]["images"] == len(fitted) == 200
    encoded = stage_records(tmp_path / "shards")
    assert encoded.keys() == fitted.keys()
    assert [key for key in fitted if encoded[key] != fitted[key]] == []


def test_classify_of_encoded_files_gives_the_evaluate_stages_top1(tiny_project, fitted, gsclip, tmp_path):
    pngs = sorted(tiny_project.eval_pngs.glob("*.png"))
    status, out, err = gsclip("encode", *pngs, "--splats", 22, "-o", tmp_path / "files",
                                  "--params", tiny_project.params_path, "--json")
    assert status == 0, err
    files = sorted((tmp_path / "files").glob("*.gsplat"))
    assert {path.stem: path.read_bytes() for path in files} == fitted

    status, out, err = gsclip("classify", *files, "--model", tiny_project.level_dir, "--top", 1,
                                  "--params", tiny_project.params_path, "--json")
    assert status == 0, err
    predicted = {row["file"].rsplit("/", 1)[-1][: -len(".gsplat")]: row["top"][0]["label"]
                 for row in json.loads(out)["files"]}
    ours = {key: int(label == tiny_project.labels[key]) for key, label in predicted.items()}
    assert ours == evaluate_stage_hits(tiny_project)
