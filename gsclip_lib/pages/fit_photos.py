"""Page ``00_fit_photos``: photographs at the paper's splat counts, beside JPEG, and findings (a), (b)."""

from __future__ import annotations

import pandas as pd

from gsclip_lib.pages.frame import PageContent, read_csv
from gsclip_lib.params import Params
from gsclip_lib.reporting import figures, paper
from gsclip_lib.reporting.tables import Column, markdown_table

COLUMNS = (
    Column("splats", "splats", "int"),
    Column("steps", "steps", "int"),
    Column("psnr", "PSNR (dB)", "float", 2),
    Column("psnr_after_codec", "after fp16 codec (dB)", "float", 2),
    Column("psnr_pruned_from_larger", "pruned from larger (dB)", "float", 2),
    Column("psnr_random_init", "random init (dB)", "float", 2),
    Column("payload_bytes", "bytes", "int"),
    Column("ratio_payload", "ratio", "float", 2),
    Column("jpeg_psnr", "JPEG, same bytes (dB)", "float", 2),
    Column("jpeg_bytes", "JPEG bytes (mean)", "float", 0),
)
NOTES = ("–: the largest count is not pruned from a larger one, and only the largest count is fitted from a "
         "random start.",)


def count_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Means over the photos, one row per splat count, largest first."""
    numeric = table.drop(columns=["photo"]).groupby("splats", as_index=False).mean()
    return numeric.sort_values("splats", ascending=False)


def _spread(values: pd.Series, unit: str = "dB") -> str:
    if len(values) < 2:
        return "one photo: a single measurement, no interval"
    return f"range {values.min():.2f}–{values.max():.2f} {unit} over {len(values)} photos"


def findings(table: pd.DataFrame, iterations: int, image_size: int) -> list[str]:
    """The photo fits against the paper's numbers, and findings (a) and (b), each with its spread."""
    largest = table["splats"].max()
    top = table[table["splats"] == largest]
    reference = paper.PHOTO_PSNR
    lines = [f"At {largest} splats the fit reaches {top['psnr'].mean():.2f} dB ({_spread(top['psnr'])}) after "
             f"{iterations} steps at {image_size} px; the paper reports {reference['psnr_db']} dB after "
             f"{reference['iterations']} steps at 224 px."]
    if top["psnr_random_init"].notna().any():
        gain = top["psnr"] - top["psnr_random_init"]
        grid = paper.GRID_VS_RANDOM
        lines.append(f"(a) The grid init is {gain.mean():+.2f} dB over a random start at {largest} splats "
                     f"({_spread(gain)}); the paper: {grid['grid_db'] - grid['random_db']:+.2f} dB at {grid['splats']}.")
    pruned = table[table["psnr_pruned_from_larger"].notna()]
    for count, rows in pruned.groupby("splats", sort=False):
        gain = rows["psnr_pruned_from_larger"] - rows["psnr"]
        lines.append(f"(b) At {count} splats, pruned from the next larger fit minus fitted directly, equal steps: "
                     f"{gain.mean():+.2f} dB ({_spread(gain)}); the paper finds pruning ahead. The paired test on "
                     "the evaluation images is on the prune page (03).")
    for count, rows in table.groupby("splats", sort=False):
        gap = rows["psnr_after_codec"] - rows["jpeg_psnr"]
        lines.append(f"{count} splats against JPEG at the same bytes: {gap.mean():+.2f} dB ({_spread(gap)}).")
    return lines


def gallery_figure(params: Params, table: pd.DataFrame):
    """The photos, every count's render (with its PSNR) and its splats as ellipses."""
    import torch

    from gsclip_lib.reporting.splat_figures import plot_fit_gallery
    from gsclip_lib.splats.container import Splats
    from gsclip_lib.splats.render import render_splats

    fits = torch.load(params.stage_dir("fit_photos") / "fits.pt", weights_only=True)
    size = fits["images"].shape[-1]
    settings = params.fit_photos.optimizer
    splats = {int(count): Splats(**tensors) for count, tensors in fits["splats"].items()}
    renders = {count: render_splats(item, size, size, backend=settings.backend, cutoff=settings.cutoff).clamp(0, 1)
               for count, item in splats.items()}
    quality = {count: torch.tensor([float(table[(table["photo"] == photo) & (table["splats"] == count)]["psnr"].iloc[0])
                                    for photo in fits["photos"]]) for count in splats}
    return plot_fit_gallery(fits["images"], renders, splats=splats, titles=fits["photos"], psnr_by_count=quality)


def build(params: Params) -> PageContent:
    folder = params.stage_dir("fit_photos")
    table = read_csv(folder / "table.csv")
    config = params.fit_photos
    content = PageContent(findings=findings(table, config.optimizer.iterations, config.image_size))
    content.tables["counts"] = markdown_table(count_frame(table), COLUMNS, notes=NOTES)
    content.figures["gallery"] = gallery_figure(params, table)
    content.figures["psnr_vs_size"] = figures.plot_psnr_against_size(table)
    content.figures["psnr_history"] = figures.plot_psnr_history(read_csv(folder / "history.csv"))
    content.figures["findings"] = figures.plot_photo_findings(table)
    return content
