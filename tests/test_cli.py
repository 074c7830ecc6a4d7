"""The command-line stages (what torchrun runs) write the same metrics as the notebooks."""

import json
from pathlib import Path

import pytest
import yaml

from gsclip_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST not installed (make test installs it)")
def test_data_stages_from_the_command_line(tmp_path):
    params = yaml.safe_load((ROOT / "params-tiny.yaml").read_text())
    params["paths"]["reports"] = str(tmp_path / "reports")
    params["data"].update(shards_dir=str(tmp_path / "shards"), train_size=20, eval_size=10, images_per_shard=10)
    params["fit"].update(
        train_shards=str(tmp_path / "shards" / "train-*.tar"), eval_shards=str(tmp_path / "shards" / "eval-*.tar"),
        out_dir=str(tmp_path / "splats"), num_splats=8, batch_size=10,
    )
    params["fit"]["optimizer"]["iterations"] = 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))

    main(["prepare", "--params", str(path)])
    main(["fit", "--params", str(path)])
    main(["prune", "--level", "4", "--params", str(path)])
    reports = tmp_path / "reports"
    fitted = json.loads((reports / "fit" / "metrics.json").read_text())
    assert fitted["train"]["images"] == 20 and fitted["eval"]["images"] == 10 and fitted["world_size"] == 1
    pruned = json.loads((reports / "prune" / "N4" / "metrics.json").read_text())
    assert pruned["eval"]["payload_bytes"] == 4 * 12 and pruned["stage_seconds"] > 0
    with pytest.raises(SystemExit, match="needs --level"):
        main(["align", "--params", str(path)])
