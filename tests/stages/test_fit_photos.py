"""The photographs' fits follow the pipeline's pruning score: one setting, ``prune.score``, decides
which splats survive everywhere."""

import pytest

from gsclip_lib.stages import fit_photos as stage


@pytest.mark.parametrize("score", ["luminance", "energy"])
def test_the_photos_are_pruned_by_the_pipelines_score(defaults, monkeypatch, tmp_path, score):
    params = defaults.params("fit_photos.image_size=16", "fit_photos.splat_counts=[32, 16]",
                             "fit_photos.optimizer.iterations=2", "fit_photos.prune_refit_iterations=1",
                             "fit_photos.compare_random_init=false", f"prune.score={score}", f"paths.reports={tmp_path}")
    used = []
    real = stage.prune_and_refit

    def recording(images, splats, count, settings, score, **options):
        used.append(score)
        return real(images, splats, count, settings, score, **options)

    monkeypatch.setattr(stage, "prune_and_refit", recording)
    result = stage.run(params, progress=False)
    assert used == [score]
    assert set(result.tables["table"]["splats"]) == {32, 16}
