"""Lightning datamodules: a base with validation-source handling and MVTec/Folder/GoodNG/Synthetic subclasses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from adx.data.dataset import AnomalyDataset, BitDepth, check_bit_depth, to_hw
from adx.data.folder import list_folder
from adx.data.goodng import list_goodng
from adx.data.mvtec import ROOT_ENV, check_root, list_mvtec
from adx.data.samples import AdxDataError, Sample, check_samples, is_image_file, list_images
from adx.data.synthetic import make_synthetic
from adx.data.tiles import TileDataset, TileShuffleSampler
from adx.distributed import ShardSampler, even_batch_size, is_distributed, rank, world_size
from adx.tiling import TileGrid, make_grid

ValSource = Literal["train_split", "test_split", "test", "none"]
CACHE_ENV = "ADX_CACHE_DIR"
MANIFEST_NAME = "k_shot.txt"
_MAX_LISTED_SHOTS = 32


@rank_zero_only
def _echo(message: str) -> None:
    """Print on global rank zero only."""
    print(message, flush=True)


def list_predict_path(path: str | Path) -> list[Sample]:
    """Samples (label -1, split "predict") for an image file or all images under a folder (recursive)."""
    p = Path(path).expanduser()
    if p.is_file():
        if not is_image_file(p):
            raise AdxDataError(
                f"--data.path '{p}' is not an image (png/jpg/jpeg/bmp/tif/tiff). Pass an image or a folder."
            )
        files = [p]
    elif p.is_dir():
        files = list_images(p, recursive=True)
        if not files:
            raise AdxDataError(
                f"no images found under --data.path folder '{p}'. Point it at a folder with images."
            )
    else:
        raise AdxDataError(f"--data.path '{p}' does not exist. Pass an existing image file or folder.")
    return [Sample(str(f), -1, "predict", "unknown") for f in files]


def _take(
    samples: list[Sample], ratio: float, rng: np.random.Generator, keep: int
) -> tuple[list[Sample], list[Sample]]:
    """Randomly pick ``round(ratio * n)`` (at least 1, leaving ``keep``) samples; return (picked, rest) in order."""
    n = len(samples)
    k = min(max(1, round(ratio * n)), n - keep) if n else 0
    chosen = set(rng.permutation(n)[: max(k, 0)].tolist())
    picked = [s for i, s in enumerate(samples) if i in chosen]
    return picked, [s for i, s in enumerate(samples) if i not in chosen]


class AnomalyDataModule(L.LightningDataModule):
    """Base datamodule: subclasses implement ``_list()``, ``name`` and ``category``; this handles splits and loaders.

    ``val_source``: ``train_split`` holds out a seeded ``val_ratio`` of train/good (normal only); ``test_split``
    moves a seeded, stratified ``val_ratio`` of the test set to validation (removed from test); ``test`` validates
    on the test set itself (thresholds then fit on test data); ``none`` disables validation.
    Validation samples keep their original ``split`` field ("train" or "test").

    ``bit_depth``: significant bits of 16-bit images ("auto" = 16; e.g. 12 for 12-bit camera data stored in
    16-bit files); 8-bit images are always scaled by 255 and float images are read as [0, 1] (adx.data.dataset).
    ``fast_jpeg``: decode large JPEGs at a reduced DCT scale (>= 2x the target) before the common resize; faster,
    but sharp edges can move by tens of grey levels, by size-dependent amounts (see adx.data.dataset).

    ``k_shot``: train on K normal images only, drawn from the training images with ``seed`` (the same seed and
    dataset give the same K; the picks for K are the first K of one seeded order, so smaller K are subsets of
    larger). They are printed at setup, kept in ``k_shot_paths`` and written by ``write_manifest``. Only
    ``val_source`` test_split, test or none are allowed with it, so validation never sees more normal images.
    ``k_shot`` 0 is zero-shot: no training images at all (for zero-shot models, ``adx.models.base.ZeroShotModule``).

    Several processes (torch.distributed initialised): every loader gives each rank its own part, see
    ``_loader`` and docs/distributed.md; ``_loader`` without ``stage`` (reference passes) gives every image.

    ``tile_size`` (None: off) turns tiling on (docs/tiling.md): ``image_size`` is then the canvas every
    image is resized to, the model sees ``tile_size`` tiles of it at ``tile_stride`` (None: 3/4 of the tile)
    and validation, test and predict images stay whole canvases (the model's inference module cuts and
    blends them). ``train_tiles`` (default True) trains on every grid tile of the training canvases, one
    sample each (``batch_size`` then counts tiles); False trains on the whole canvases.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        val_source: ValSource = "train_split",
        val_ratio: float = 0.1,
        seed: int = 0,
        path: str | None = None,
        verify_images: bool = True,
        bit_depth: BitDepth = "auto",
        fast_jpeg: bool = False,
        k_shot: int | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_stride: int | tuple[int, int] | None = None,
        train_tiles: bool = True,
    ) -> None:
        super().__init__()
        self.image_size = to_hw(image_size)
        if tile_size is None and tile_stride is not None:
            raise AdxDataError(
                f"--data.tile_stride {tile_stride} is set but tiling is off: set --data.tile_size too (e.g. "
                f"--data.tile_size 256), or drop --data.tile_stride."
            )
        self.tiling: TileGrid | None = (
            None if tile_size is None else make_grid(image_size, tile_size, tile_stride)
        )
        self.train_tiles = bool(train_tiles)
        self.bit_depth = check_bit_depth(bit_depth)
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise AdxDataError(f"{key} must be >= 1, got {value}. Fix --data.{key}.")
        if num_workers < 0:
            raise AdxDataError(f"num_workers must be >= 0, got {num_workers}. Fix --data.num_workers.")
        if val_source not in ("train_split", "test_split", "test", "none"):
            raise AdxDataError(
                f"val_source must be one of train_split, test_split, test, none; got {val_source!r}. Fix --data.val_source."
            )
        if val_source in ("train_split", "test_split") and not 0.0 < val_ratio < 1.0:
            raise AdxDataError(f"val_ratio must be in (0, 1), got {val_ratio}. Fix --data.val_ratio.")
        if k_shot is not None:
            if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
                raise AdxDataError(
                    f"k_shot must be a whole number >= 0 (0: zero-shot, no training images; unset: all of "
                    f"them), got {k_shot!r}. "
                    "Fix --data.k_shot."
                )
            if val_source == "train_split":
                raise AdxDataError(
                    f"--data.k_shot {k_shot} cannot be combined with --data.val_source train_split: validation "
                    "would use normal training images beyond the K shots. Set --data.val_source test_split "
                    "(threshold from a held-out part of the test set) or none."
                )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_source = val_source
        self.val_ratio = val_ratio
        self.seed = seed
        self.path = path
        self.verify_images = verify_images
        self.fast_jpeg = fast_jpeg
        self.k_shot = k_shot
        self.k_shot_paths: list[str] = []  # absolute paths of the K training images (filled at setup)
        self._n_train_available = 0
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.predict_samples: list[Sample] = []
        self._listed = False

    # --- to implement in subclasses -------------------------------------------------------------------------
    def _list(self) -> list[Sample]:
        """All train and test samples of the dataset."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """Dataset name used for run folders (subclasses override)."""
        return type(self).__name__.lower()

    @property
    def category(self) -> str:
        """Category name used for run folders (subclasses override)."""
        return "default"

    def _summary_note(self) -> str:
        """Optional extra text for the split summary."""
        return ""

    # --- splits -----------------------------------------------------------------------------------------------
    @property
    def val_has_anomalies(self) -> bool:
        """True if the validation set contains anomalous images (so thresholds can use both classes)."""
        return any(s.label == 1 for s in self.val_samples)

    def setup(self, stage: str | None = None) -> None:
        """List and check samples (once), split them, and print a summary."""
        if stage == "predict" and self.path is not None:
            if not self.predict_samples:
                self.predict_samples = list_predict_path(self.path)
                check_samples(self.predict_samples, self.verify_images)
                _echo(f"[adx.data] predict: {len(self.predict_samples)} image(s) from '{self.path}'")
            return
        if not self._listed:
            samples = self._list()
            check_samples(samples, self.verify_images)
            self._split(samples)
            self._listed = True
            _echo(self.summary())
        if stage == "predict":
            self.predict_samples = [*self.test_samples]

    def _split(self, samples: list[Sample]) -> None:
        """Fill train/val/test sample lists according to ``val_source``."""
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        if not train:
            raise AdxDataError(
                f"dataset '{self.name}/{self.category}' has no training images. Check --data.root."
            )
        self._n_train_available = len(train)
        if self.k_shot is not None:
            train = self._pick_shots(train)
        rng = np.random.default_rng(self.seed)
        val: list[Sample] = []
        if self.val_source == "train_split":
            if len(train) < 2:
                raise AdxDataError(
                    f"val_source=train_split needs >= 2 training images, '{self.name}/{self.category}' has "
                    f"{len(train)}. Add images or set --data.val_source none."
                )
            val, train = _take(train, self.val_ratio, rng, keep=1)
        elif self.val_source == "test_split":
            good = [s for s in test if s.label == 0]
            bad = [s for s in test if s.label != 0]
            val_good, test_good = _take(good, self.val_ratio, rng, keep=1)
            val_bad, test_bad = _take(bad, self.val_ratio, rng, keep=1)
            val = val_good + val_bad
            test = test_good + test_bad
        elif self.val_source == "test":
            val = list(test)
        self.train_samples, self.val_samples, self.test_samples = train, val, test

    def _pick_shots(self, train: list[Sample]) -> list[Sample]:
        """The ``k_shot`` training samples (listing order): the first K of a permutation seeded by ``seed``."""
        if self.k_shot > len(train):
            raise AdxDataError(
                f"k_shot={self.k_shot} but dataset '{self.name}/{self.category}' has {len(train)} training "
                f"image(s). Set --data.k_shot to at most {len(train)}."
            )
        # a stream of its own, so the validation/test split is the same with and without k_shot
        order = np.random.default_rng([self.seed, 1]).permutation(len(train))
        chosen = set(order[: self.k_shot].tolist())
        shots = [s for i, s in enumerate(train) if i in chosen]
        self.k_shot_paths = [os.path.abspath(s.image_path) for s in shots]
        return shots

    def write_manifest(self, folder: str | Path) -> Path:
        """Write ``k_shot_paths`` (one per line) to ``folder/k_shot.txt`` (``k_shot_1.txt``... if taken); return it."""
        if self.k_shot is None:
            raise AdxDataError("write_manifest: no k-shot selection to write; --data.k_shot is not set.")
        if not self.k_shot_paths:
            raise RuntimeError("write_manifest: call setup() first, which picks the k-shot images.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem, suffix = Path(MANIFEST_NAME).stem, Path(MANIFEST_NAME).suffix
        n = 0
        while True:
            path = folder / (MANIFEST_NAME if n == 0 else f"{stem}_{n}{suffix}")
            try:
                with path.open("x", encoding="utf-8") as handle:  # exclusive: never overwrites
                    handle.write("".join(f"{p}\n" for p in self.k_shot_paths))
                return path
            except FileExistsError:
                n += 1

    def summary(self) -> str:
        """A short multi-line description of the splits."""
        n_good = sum(s.label == 0 for s in self.test_samples)
        n_bad = len(self.test_samples) - n_good
        val_good = sum(s.label == 0 for s in self.val_samples)
        val_desc = {
            "train_split": f"held out {self.val_ratio:.0%} of train/good, normal only, seed {self.seed}",
            "test_split": f"{self.val_ratio:.0%} of test moved to val (removed from test), seed {self.seed}",
            "test": "the test set itself",
            "none": "disabled",
        }[self.val_source]
        h, w = self.image_size
        depth = f", 16-bit images read as {self.bit_depth}-bit" if self.bit_depth != "auto" else ""
        tiles = ""
        if self.tiling is not None:
            on = (
                f"training on its {len(self.train_samples) * self.tiling.count} tiles"
                if self.train_on_tiles
                else "training on whole canvases"
            )
            tiles = f", {self.tiling.describe()}; {on}"
        lines = [
            f"[adx.data] {self.name}/{self.category} @ {h}x{w}{depth}{tiles}{self._summary_note()}",
            f"  train {len(self.train_samples)} | val {len(self.val_samples)} ({val_good} good, "
            f"{len(self.val_samples) - val_good} defective; {self.val_source}: {val_desc})",
            f"  test  {len(self.test_samples)} ({n_good} good, {n_bad} defective)",
        ]
        if self.k_shot is not None:
            lines.append(
                f"  k_shot {self.k_shot}: training on {self.k_shot} of {self._n_train_available} normal training "
                f"images, picked with seed {self.seed}:"
            )
            lines += [f"    {p}" for p in self.k_shot_paths[:_MAX_LISTED_SHOTS]]
            if len(self.k_shot_paths) > _MAX_LISTED_SHOTS:
                lines.append(
                    f"    ... and {len(self.k_shot_paths) - _MAX_LISTED_SHOTS} more (all in k_shot_paths / "
                    "write_manifest())"
                )
        if self.val_source == "test":
            lines.append(
                "  !!! WARNING: val_source=test - validation IS the test set, so thresholds/early stopping are fitted "
                "on test data and test metrics are optimistic. Use train_split or test_split for honest numbers."
            )
        return "\n".join(lines)

    # --- tiling ----------------------------------------------------------------------------------------------
    @property
    def train_on_tiles(self) -> bool:
        """True when training images are given as their grid tiles (tiling on and ``train_tiles``)."""
        return self.tiling is not None and self.train_tiles

    @property
    def tiles_per_image(self) -> int:
        """Training samples per training image: the grid's tile count when training on tiles, else 1."""
        return self.tiling.count if self.train_on_tiles and self.tiling is not None else 1

    # --- loaders ---------------------------------------------------------------------------------------------
    def _loader(
        self,
        samples: list[Sample],
        batch_size: int,
        shuffle: bool,
        stage: str | None = None,
        tiles: bool = False,
    ) -> DataLoader:
        """DataLoader over ``samples`` with this module's worker settings (all of them, on every rank).

        With ``stage`` named and several processes, this rank's part only: a seeded ``DistributedSampler``
        reshuffled every epoch when ``shuffle`` (gradient training; it repeats a few images so that every
        rank takes the same number of steps), else a disjoint slice without repeats (:class:`ShardSampler`)
        and a batch size that gives every rank the same number of batches. ``tiles``: the grid tiles of the
        canvases, one sample each (:class:`TileDataset`), shuffled by :class:`TileShuffleSampler`.
        """
        dataset: Any = AnomalyDataset(samples, self.image_size, self.bit_depth, self.fast_jpeg)
        sampler: Sampler | None = None
        shuffle = shuffle and len(samples) > 0  # zero-shot: an empty training set, nothing to shuffle
        if tiles and self.tiling is not None:
            dataset = TileDataset(dataset, self.tiling)
            if shuffle and not (stage is not None and is_distributed()):
                sampler, shuffle = TileShuffleSampler(len(samples), self.tiling.count, self.seed), False
        if stage is not None and is_distributed():
            if shuffle:
                sampler = DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=self.seed)
            else:
                batch_size = self._even_batch_size(len(dataset), batch_size, stage)
                sampler = ShardSampler(dataset, world_size(), rank())
            shuffle = False
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _even_batch_size(self, n: int, batch_size: int, stage: str) -> int:
        """``batch_size`` or a nearby one that gives every rank's slice the same number of batches."""
        world = world_size()
        if n < world:
            fix = {
                "validate": "raise --data.val_ratio, ",
                "test": "add test images, ",
                "train": "add training images, ",
            }.get(stage, "")
            raise AdxDataError(
                f"the {stage} images of '{self.name}/{self.category}' ({n}) are fewer than the {world} processes "
                f"of this run; every process needs at least one: {fix}or run on fewer --trainer.devices."
            )
        return even_batch_size(n, world, batch_size)

    @property
    def _one_pass(self) -> bool:
        """True when the trainer fits a one-pass method (training images read once, in order)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return bool(getattr(module, "one_pass", False))

    def train_dataloader(self) -> DataLoader:
        # one-pass methods read each image once, in listing order (the same bank/statistics on any number of
        # processes); trained methods get shuffled batches
        return self._loader(
            self.train_samples,
            self.batch_size,
            shuffle=not self._one_pass,
            stage="train",
            tiles=self.train_on_tiles,
        )

    def reference_dataloader(self) -> DataLoader:
        """Every training image (its tiles when training on tiles), in order, for reference-statistics passes."""
        return self._loader(
            self.train_samples, self.eval_batch_size, shuffle=False, tiles=self.train_on_tiles
        )

    def held_out_normal_dataloader(self) -> tuple[DataLoader, str]:
        """(loader, what it holds) for calibrating on normal images the model did not train on.

        The normal validation images (their tiles when tiling, as at test time) when the validation set has
        any, else every training image; in order, on every process.
        """
        normal = [s for s in self.val_samples if s.label == 0]
        samples, what = (
            (normal, "held-out normal images") if normal else (self.train_samples, "training images")
        )
        return self._loader(samples, self.eval_batch_size, shuffle=False, tiles=self.tiling is not None), what

    def val_dataloader(self) -> DataLoader | list[Any]:
        if not self.val_samples:
            return []
        return self._loader(self.val_samples, self.eval_batch_size, shuffle=False, stage="validate")

    def _require(self, samples: list[Sample], stage: str) -> list[Sample]:
        """Return ``samples`` or raise a clear error when the stage has no images."""
        if not samples:
            raise AdxDataError(
                f"dataset '{self.name}/{self.category}' has no images for stage '{stage}'. Add test images, "
                "pass --data.path for predict, or use --data.val_source train_split/none so validation keeps them."
            )
        return samples

    def test_dataloader(self) -> DataLoader:
        samples = self._require(self.test_samples, "test")
        return self._loader(samples, self.eval_batch_size, shuffle=False, stage="test")

    def predict_dataloader(self) -> DataLoader:
        samples = self._require(self.predict_samples, "predict")
        return self._loader(samples, self.eval_batch_size, shuffle=False, stage="predict")


def _env_root(root: str | None) -> str | None:
    """``root`` or, if None, the ``ADX_DATA_ROOT`` environment variable."""
    return root if root is not None else os.environ.get(ROOT_ENV)


class MVTec(AnomalyDataModule):
    """MVTec-AD-layout dataset ``<root>/<category>``; ``root`` defaults to ``$ADX_DATA_ROOT``."""

    def __init__(self, root: str | None = None, category: str = "bottle", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = _env_root(root)
        self._category = category

    @property
    def name(self) -> str:
        return Path(self.root).expanduser().resolve().name.lower() if self.root else "mvtec"

    @property
    def category(self) -> str:
        return self._category

    def _list(self) -> list[Sample]:
        return list_mvtec(check_root(self.root), self._category)


class Folder(AnomalyDataModule):
    """Custom layout: a normal folder plus optional abnormal/mask folders (see ``adx.data.folder``)."""

    def __init__(
        self,
        root: str,
        normal_dir: str = "good",
        abnormal_dirs: list[str] | None = None,
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
        normal_split_ratio: float = 0.2,
        category: str = "custom",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= normal_split_ratio < 1.0:
            raise AdxDataError(
                f"normal_split_ratio must be in [0, 1), got {normal_split_ratio}. Fix --data.normal_split_ratio."
            )
        self.root = root
        self.normal_dir = normal_dir
        self.abnormal_dirs = list(abnormal_dirs or [])
        self.mask_dir = mask_dir
        self.normal_test_dir = normal_test_dir
        self.normal_split_ratio = normal_split_ratio
        self._category = category

    @property
    def name(self) -> str:
        return "folder"

    @property
    def category(self) -> str:
        return self._category

    def _summary_note(self) -> str:
        if self.normal_test_dir is not None:
            return ""
        return f" (normal images split {1 - self.normal_split_ratio:.0%} train / {self.normal_split_ratio:.0%} test, seed {self.seed})"

    def _list(self) -> list[Sample]:
        return list_folder(
            self.root,
            self.normal_dir,
            self.abnormal_dirs,
            self.mask_dir,
            self.normal_test_dir,
            self.normal_split_ratio,
            self.seed,
        )


class GoodNG(AnomalyDataModule):
    """good/ng layout (``train/good``, ``test/good``, ``test/ng*``); category defaults to the root folder name."""

    def __init__(self, root: str, category: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self._category = category

    @property
    def name(self) -> str:
        return "goodng"

    @property
    def category(self) -> str:
        return self._category or Path(self.root).expanduser().resolve().name

    def _list(self) -> list[Sample]:
        return list_goodng(self.root)


def default_synthetic_root(category: str) -> Path:
    """Cache folder for generated data: ``$ADX_CACHE_DIR/synthetic/<category>`` or ``~/.cache/adx/synthetic/<category>``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "adx") / "synthetic" / category


class Synthetic(AnomalyDataModule):
    """Generated textured-surface dataset (scratches and stains), cached on disk; ideal for smoke tests.

    The images are always generated with seed 0 (``seed`` only drives the splits), so runs with different seeds
    share one cache folder safely.
    """

    def __init__(
        self,
        root: str | None = None,
        category: str = "demo",
        n_train: int = 40,
        n_test_good: int = 10,
        n_test_bad: int = 20,
        size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser() if root is not None else default_synthetic_root(category)
        self._category = category
        self.n_train, self.n_test_good, self.n_test_bad, self.size = n_train, n_test_good, n_test_bad, size

    @property
    def name(self) -> str:
        return "synthetic"

    @property
    def category(self) -> str:
        return self._category

    def prepare_data(self) -> None:
        """Generate the images once (rank zero) if they are not cached yet."""
        self._generate()

    def _generate(self) -> Path:
        """Create or reuse the generated category folder."""
        return make_synthetic(self.root, self.n_train, self.n_test_good, self.n_test_bad, self.size, seed=0)

    def _list(self) -> list[Sample]:
        folder = self._generate()
        return list_mvtec(folder.parent, folder.name)
