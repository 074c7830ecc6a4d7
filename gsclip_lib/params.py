"""The schema of ``params.yaml``: one typed config per group, and the whole file as :class:`Params`.

``params.yaml`` holds every value; these models hold none (see :mod:`gsclip_lib.config`): each field
mirrors one key of the file, with its type and its valid range, and ``tests/test_params.py`` checks
that the two agree key for key. The models are gathered in this one module, rather than beside each
stage's code, so that a stage depends on the schema of the values it reads and not on the code of
the other stages (DVC reruns a stage when any module it imports changes).

Cross-group rules live on :class:`Params`: the image-text shards every stage reads follow
``data.shards_dir`` unless a group names its own; DVC output folders must not nest; the pruned
levels lie below the fitted one, which fits in the image. Image size and channels are declared once,
in ``data``, and every stage reads them there.

:func:`load_params` is the one loader: ``params.yaml``, a profile laid over it, ``--set``
overrides, validated. METHOD.md explains what the values mean for the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import Field, model_validator

from gsclip_lib.config import ConfigModel, compose, validate_config
from gsclip_lib.errors import ConfigError

RenderBackend = Literal["auto", "triton", "triton_tiled", "cpu", "windowed", "dense"]  # gsclip_lib.splats.render
InitMethod = Literal["grid", "gradient", "random"]  # gsclip_lib.splats.initialization
IMAGENET_SPLIT = "imagenet"  # the split name of the ImageNet-style evaluation folder
NO_SHARDS = "none"  # data.eval_shards: there is no labelled evaluation split

PositiveInt = Field(gt=0)
PositiveFloat = Field(gt=0)


def level_name(count: int) -> str:
    """The name of a compression level, ``N<count>``: its folders, metric keys and figure labels."""
    return f"N{count}"


# ----------------------------------------------------------------------------------------------
# Shared sub-groups


class FitSettings(ConfigModel):
    """How splats are fitted to images (``fit.optimizer``, ``fit_photos.optimizer``);
    :mod:`gsclip_lib.splats.fitting` explains each lever."""

    iterations: int = Field(ge=0)  # optimizer steps
    init: InitMethod
    lr_positions: float = PositiveFloat  # Adam step size of the centres, pixels
    lr_cholesky: float = PositiveFloat  # ... of the Cholesky factors, pixels
    lr_colours: float = PositiveFloat  # ... of the colours (unused when they are solved every step)
    colour_l1: float = Field(ge=0)  # lambda of the L1 penalty on colours
    colour_solve: Literal["none", "sparse", "periodic"]  # least-squares colours: never, at start/re-seeds/end, every k steps
    solve_every: int = PositiveInt  # k of ``periodic``: steps between solves (1: every step, Adam leaves the colours alone)
    ridge: float = PositiveFloat  # relative ridge of the colour solve
    cg_iterations: int = Field(ge=1)  # conjugate-gradient steps per solve of a large image
    reseed_every: int = Field(ge=0)  # steps between error-guided re-seedings; 0: none
    reseed_until: float = Field(ge=0, le=1)  # ... during this share of the steps
    reseed_fraction: float = Field(gt=0, le=1)  # at most this share of an image's splats moves each time
    reseed_energy: float = Field(ge=0)  # a splat is dead below this times its image's median energy
    min_scale: float = PositiveFloat  # floor of the Cholesky diagonal, pixels
    cutoff: float = PositiveFloat  # a splat is zero beyond this many standard deviations
    backend: RenderBackend
    max_retries: int = Field(ge=0)  # restarts of an image whose loss turns non-finite
    log_every: int = PositiveInt  # iterations between history points
    seed: int = Field(ge=0)


class OptimConfig(ConfigModel):
    """One training run of :func:`gsclip_lib.training.loop.train` (``pretrain.optim``, ``align.*``)."""

    epochs: int = PositiveInt
    batch_size: int = PositiveInt  # per rank (the global batch is batch_size * world_size)
    lr: float = PositiveFloat  # peak learning rate, after the linear warm-up
    weight_decay: float = Field(ge=0)  # AdamW's decoupled decay, matrices only
    warmup_steps: int = Field(ge=0)
    grad_clip: float = Field(ge=0)  # max global gradient norm; 0 disables
    seed: int = Field(ge=0)
    log_every: int = PositiveInt  # optimizer steps between rows of the history
    checkpoint_every: int = Field(ge=0)  # steps between mid-epoch checkpoints; 0: at epoch ends only


class LoaderConfig(ConfigModel):
    """How a training stage streams its shards (:mod:`gsclip_lib.data.streaming`; ``pretrain.loader``,
    ``align.loader``)."""

    num_workers: int = Field(ge=0)  # DataLoader worker processes per rank; 0: read in the training process
    shuffle_buffer: int = Field(ge=0)  # raw samples held for shuffling, per worker; 0: shard order
    samples_per_epoch: int = Field(ge=0)  # the split's samples per epoch; 0: count them from the tar headers


class SplatEncoderConfig(ConfigModel):
    """The splat image tower (``align.encoder``), :mod:`gsclip_lib.models.splat_encoder`."""

    fourier_frequencies: int = Field(ge=0)  # octaves of the Fourier features
    num_latents: int = PositiveInt  # K tokens out of the resampler
    resampler_layers: int = PositiveInt
    resampler_heads: int = PositiveInt
    mlp_ratio: float = PositiveFloat
    unfreeze_first_blocks: int = Field(ge=0)  # first k RGB blocks trained as copies
    latents: Literal["learned", "teacher_grid"]  # free queries, or one per cell of the RGB ViT's patch grid
    locality_width: float = Field(ge=0)  # start width of the Gaussian locality bias ([-1, 1] units); 0: none
    norm_pre: Literal["rms", "teacher_ln"]  # the norm before the blocks: RMSNorm, or a copy of the RGB ln_pre

    @model_validator(mode="after")
    def _locality_needs_places(self) -> "SplatEncoderConfig":
        if self.locality_width > 0 and self.latents != "teacher_grid":
            raise ValueError("locality_width > 0 needs latents: teacher_grid (a latent needs a place in the image)")
        return self


# ----------------------------------------------------------------------------------------------
# One model per group of params.yaml


class PathsConfig(ConfigModel):
    reports: str = Field(min_length=1)  # executed notebooks, metrics JSON, plot data, figures


class PhotoFitConfig(ConfigModel):
    """``fit_photos``: scikit-image's photographs fitted at the paper's splat counts."""

    photos: list[Literal["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]] = (
        Field(min_length=1)
    )
    image_size: int = PositiveInt
    splat_counts: list[int] = Field(min_length=1)
    prune_refit_iterations: int = Field(ge=0)  # also prune the largest fit to each count and refit; 0 skips
    compare_random_init: bool  # also fit the largest count from a random start (the paper's ablation)
    optimizer: FitSettings

    @model_validator(mode="after")
    def _counts_fit_the_image(self) -> "PhotoFitConfig":
        for count in self.splat_counts:
            if not 0 < count <= self.image_size**2:
                raise ValueError(f"splat_counts holds {count}: each must lie in 1..image_size^2 = {self.image_size**2}")
        return self


class DataConfig(ConfigModel):
    """``data``: where the images come from and how every stage reads them."""

    fashion_mnist_dir: str  # the four idx .gz files of Debian's dataset-fashion-mnist
    shards_dir: str = Field(min_length=1)  # prepare writes train-*.tar, eval-*.tar, imagenet-*.tar here
    train_shards: str  # "": the prepared <shards_dir>/train-*.tar; else any shard spec (DataComp)
    eval_shards: str  # "": the prepared <shards_dir>/eval-*.tar; "none": no labelled eval split; else a spec
    train_size: int = PositiveInt  # class-balanced subset of Fashion-MNIST's 60,000 training images
    eval_size: int = PositiveInt  # class-balanced subset of its 10,000 test images
    images_per_shard: int = PositiveInt
    seed: int = Field(ge=0)  # same seed, same subset and captions
    image_size: int = PositiveInt  # every stage reads images as this square
    channels: Literal[1, 3]  # 1 gray, 3 RGB
    resize_mode: Literal["center_crop", "resize"]
    imagenet_dir: str  # an ImageNet-style folder root/<class>/<images>; "": none
    imagenet_class_names: str  # one name per class folder; "": open_clip's names for 1000 wnid folders

    @model_validator(mode="after")
    def _class_names_need_a_folder(self) -> "DataConfig":
        if self.imagenet_class_names and not self.imagenet_dir:
            raise ValueError("imagenet_class_names is set but imagenet_dir is empty")
        return self

    def shard_pattern(self, split: str) -> str:
        """The printf pattern ``prepare`` writes a split's shards to."""
        return str(Path(self.shards_dir) / f"{split}-%06d.tar")

    def prepared_shards(self, split: str) -> str:
        return str(Path(self.shards_dir) / f"{split}-*.tar")

    def train_spec(self) -> str:
        """The image-text shards every training stage reads."""
        return self.train_shards or self.prepared_shards("train")

    def eval_spec(self) -> str | None:
        """The labelled evaluation shards, or None when there are none."""
        if self.eval_shards == NO_SHARDS:
            return None
        return self.eval_shards or self.prepared_shards("eval")

    def imagenet_shards(self) -> str:
        """The shard spec of the ImageNet-style folder, once ``prepare`` has written it."""
        return self.prepared_shards(IMAGENET_SPLIT)

    def imagenet_classes_file(self) -> Path:
        """Written by ``prepare`` beside the folder's shards: its class names, in label order."""
        return Path(self.shards_dir) / f"{IMAGENET_SPLIT}-classes.json"


class FitConfig(ConfigModel):
    """``fit``: every image fitted once, at the largest level."""

    out_dir: str = Field(min_length=1)  # splat shards go to out_dir/N<count>/<split>/
    num_splats: int = PositiveInt  # the largest level; the smaller ones come from pruning
    batch_size: int = PositiveInt  # images fitted together under one optimizer
    optimizer: FitSettings


class PruneConfig(ConfigModel):
    """``prune``: the smaller levels, each pruned from the next larger one and refitted."""

    levels: list[int] = Field(min_length=1)  # splat counts below fit.num_splats
    score: Literal["luminance", "energy"]  # which splats survive (gsclip_lib.splats.pruning)
    refit_iterations: int = Field(ge=0)  # refit steps of the survivors at each level; 0: colours only
    compare_fit_small: bool  # also fit each level's count directly, same total steps (evaluation split)
    fit_small_images: int = Field(ge=0)  # images of that split the comparison fits (0: all): a figure's sample

    @model_validator(mode="after")
    def _distinct_positive_levels(self) -> "PruneConfig":
        if any(level <= 0 for level in self.levels) or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be distinct positive counts, got {self.levels}")
        return self


class RgbModelConfig(ConfigModel):
    """``model``: the RGB CLIP, teacher and baseline, built through open_clip from a name."""

    name: str = Field(min_length=1)  # an open_clip config name; ours live in models/model_configs/
    pretrained: str  # an open_clip pretrained tag, read from the local cache only
    checkpoint: str  # a local checkpoint to start from; "" and no tag: trained from scratch


class PretrainConfig(ConfigModel):
    """``pretrain``: contrastive training of the RGB CLIP on ``data``'s training shards."""

    checkpoint_dir: str = Field(min_length=1)  # last.pt (resumable) and model.pt (the result)
    optim: OptimConfig
    loader: LoaderConfig

    def model_path(self) -> Path:
        return Path(self.checkpoint_dir) / "model.pt"


class AlignConfig(ConfigModel):
    """``align``: the splat tower and its two training stages, per level."""

    encoder: SplatEncoderConfig
    distill_target: Literal["embedding", "tokens"]  # stage 1 matches the teacher's CLS embedding, or its block inputs
    distill: OptimConfig  # stage 1 (paper: 2 epochs)
    contrastive: OptimConfig  # stage 2 (paper: 5 epochs)
    unfreeze_text_last_block: bool  # also train a copy of the text tower's last block
    cache_text_embeddings: bool  # frozen text tower: keep the embeddings of recent captions
    text_cache_size: int = PositiveInt  # captions whose embeddings are kept (least recently used go first)
    loader: LoaderConfig
    checkpoint_dir: str = Field(min_length=1)  # N<count>/{distill,contrastive}/last.pt, splat_encoder.pt

    @model_validator(mode="after")
    def _tokens_need_a_grid(self) -> "AlignConfig":
        if self.distill_target == "tokens" and self.encoder.latents != "teacher_grid":
            raise ValueError(
                "distill_target: tokens needs encoder.latents: teacher_grid (each latent is matched to its patch cell)"
            )
        return self

    def level_dir(self, count: int) -> Path:
        return Path(self.checkpoint_dir) / level_name(count)

    def tower_path(self, count: int) -> Path:
        return self.level_dir(count) / "splat_encoder.pt"


class EvaluateConfig(ConfigModel):
    """``evaluate``: zero-shot scoring of every representation on every evaluation set."""

    eval_classes: str = Field(min_length=1)  # names of data.eval_shards' labels: fashion_mnist | imagenet | a file
    batch_size: int = PositiveInt
    accounting: Literal["payload", "record"]  # a level's byte budget: the paper's payload, or with header
    baselines: list[Literal["jpeg", "thumbnail"]]  # the RGB model on images re-encoded at each budget


# ----------------------------------------------------------------------------------------------
# The whole file


class Params(ConfigModel):
    """Every group of ``params.yaml``, checked against each other."""

    paths: PathsConfig
    fit_photos: PhotoFitConfig
    data: DataConfig
    fit: FitConfig
    prune: PruneConfig
    model: RgbModelConfig
    pretrain: PretrainConfig
    align: AlignConfig
    evaluate: EvaluateConfig

    @model_validator(mode="after")
    def _groups_agree(self) -> "Params":
        pixels = self.data.image_size**2
        if self.fit.num_splats > pixels:
            raise ValueError(
                f"fit.num_splats = {self.fit.num_splats} is more than the {pixels} pixels of "
                f"data.image_size = {self.data.image_size}"
            )
        below = [level for level in self.prune.levels if level >= self.fit.num_splats]
        if below:
            raise ValueError(f"prune.levels {below} must lie below fit.num_splats = {self.fit.num_splats}")
        folders = {
            "data.shards_dir": self.data.shards_dir,
            "fit.out_dir": self.fit.out_dir,
            "pretrain.checkpoint_dir": self.pretrain.checkpoint_dir,
            "align.checkpoint_dir": self.align.checkpoint_dir,
            "paths.reports": self.paths.reports,
        }
        for key, folder in folders.items():
            for other, other_folder in folders.items():
                if key != other and _inside(folder, other_folder):
                    raise ValueError(
                        f"{key} ({folder}) lies inside {other} ({other_folder}): each stage's outputs need a folder of their own"
                    )
        if self.data.eval_spec() is None and not self.data.imagenet_dir:
            raise ValueError("nothing to evaluate: data.eval_shards is 'none' and data.imagenet_dir is empty")
        return self

    def levels(self) -> list[int]:
        """Every compression level, largest first: the fitted one, then the pruned ones."""
        return [self.fit.num_splats, *sorted(self.prune.levels, reverse=True)]

    def trained_rgb_model(self) -> RgbModelConfig:
        """The RGB model the stages after ``pretrain`` use (the teacher, the pixel baseline): the
        weights the pretrain stage saved."""
        return self.model.replace(checkpoint=str(self.pretrain.model_path()), pretrained="")

    def splat_splits(self) -> dict[str, str]:
        """Every split the fit stage fits, by name, with its image shard spec: ``train``, ``eval``
        (unless there is none) and ``imagenet`` when ``data.imagenet_dir`` is set."""
        splits = {"train": self.data.train_spec()}
        eval_spec = self.data.eval_spec()
        if eval_spec is not None:
            splits["eval"] = eval_spec
        if self.data.imagenet_dir:
            splits[IMAGENET_SPLIT] = self.data.imagenet_shards()
        return splits

    def shown_split(self) -> str:
        """The split the example figures draw: the first evaluation split."""
        return next(split for split in self.splat_splits() if split != "train")

    def splat_dir(self, count: int, split: str) -> Path:
        """Where one level's splat shards of one split live: ``fit.out_dir/fitted/N<count>/<split>``
        for the fitted level, ``fit.out_dir/pruned/N<count>/<split>`` for the pruned ones."""
        origin = "fitted" if count == self.fit.num_splats else "pruned"
        return Path(self.fit.out_dir) / origin / level_name(count) / split

    def stage_dir(self, stage: str, level: int | None = None) -> Path:
        """The folder a stage writes its metrics and figures to: ``paths.reports/<stage>[/N<level>]``."""
        folder = Path(self.paths.reports) / stage
        return folder / level_name(level) if level is not None else folder


def _inside(path: str, folder: str) -> bool:
    child, parent = Path(path).resolve(), Path(folder).resolve()
    return child == parent or parent in child.parents


def load_params(
    params_path: str | Path = "params.yaml", *, profile: str | Path | None = None, overrides: Iterable[str] = ()
) -> Params:
    """``params.yaml`` with ``profile`` laid over it and ``overrides`` (``group.key=value``) on top."""
    overrides = list(overrides)
    source = str(params_path) + (f" + {profile}" if profile else "") + (" + --set" if overrides else "")
    return validate_config(Params, compose(params_path, profile, overrides), source)


def params_dict(params: Params) -> dict[str, Any]:
    """``params`` as plain data, shaped as in params.yaml."""
    return params.model_dump(mode="json")


__all__ = [
    "AlignConfig", "ConfigError", "DataConfig", "EvaluateConfig", "FitConfig", "FitSettings", "OptimConfig",
    "Params", "PathsConfig", "PhotoFitConfig", "PretrainConfig", "PruneConfig", "RgbModelConfig",
    "SplatEncoderConfig", "level_name", "load_params", "params_dict",
]
