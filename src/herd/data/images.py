"""ImageDataModule: labelled images for the vision stage.

Sources (data.source):
- `digits`: scikit-learn's handwritten digits (1797 8x8 images, values 0-16, ten classes),
  shipped with scikit-learn, upsampled to the encoder's input size;
- `folder`: an ImageFolder layout, ROOT/CLASS_NAME/*.png|jpg|... (class = sub-folder name);
- `manifest`: a JSONL file of `{"image": PATH, "label": INT_OR_NAME}` lines, image paths
  relative to the manifest.

Every source is split once into train/val/test, stratified by class with a fixed seed.
Images are decoded up front (fail fast: a missing or corrupt file stops the run before
training, naming the file and manifest line, or is skipped and counted with
skip_bad_samples) and kept in memory as uint8 [N, C, S, S], which suits data sets of up to
a few hundred thousand small images.

Batches are {"image": float [B, C, S, S] in [-1, 1], "label": int64 [B]}.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from herd.data.base import HerdDataModule, check_source
from herd.data.manifest import read_jsonl_manifest
from herd.data.sampling import draw_key, resumable_train_sampler
from herd.errors import ConfigError, DataError
from herd.models.vision import ImageEncoderConfig
from herd.utils.config import plain
from herd.utils.rng import sample_seed, seeded_torch

log = logging.getLogger(__name__)

SOURCES = ("digits", "folder", "manifest")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


# ----------------------------------------------------------------------------- reading


def digits_images(image_size: int, channels: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """scikit-learn's digits as uint8 [1797, channels, S, S] (ink bright on black), labels, names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float()[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    # Bilinear upsampling keeps strokes smooth; antialias only matters when shrinking.
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear")
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, channels, -1, -1)
    return images.contiguous(), [int(t) for t in digits.target], [str(i) for i in range(10)]


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """One image file -> uint8 [channels, S, S]. Grayscale, RGB, RGBA and palette images are
    converted: transparency is composited onto white, colour to gray with ITU-R 601 weights,
    gray to RGB by repetition. Raises OSError / ValueError for missing or corrupt files."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not in a later batch
        return pil_to_tensor(img, image_size, channels)


def pil_to_tensor(img, image_size: int, channels: int) -> torch.Tensor:
    """A decoded PIL image -> uint8 [channels, S, S], converted as load_image says."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # [C, S, S]


def _image_entry(record: dict, root: Path) -> tuple[Path, object]:
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError('missing a string "image" field')
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise ValueError('missing an integer or string "label" field')
    if isinstance(label, int) and label < 0:
        raise ValueError(f'"label" {label} is negative')
    return root / image, label


def read_image_manifest(path: str | Path, skip_bad: bool = False) -> list[tuple[Path, object, int]]:
    """(image path, label, line number) per line of a JSONL manifest `{"image": ..., "label": ...}`,
    paths relative to the manifest (bad lines: see herd.data.manifest.read_jsonl_manifest)."""
    entries = read_jsonl_manifest(path, _image_entry, skip_bad, "images")
    return [(image, label, lineno) for (image, label), lineno in entries]


def folder_entries(root: str | Path) -> list[tuple[Path, object, int]]:
    """(image path, class name, 0) for ROOT/CLASS/IMAGE files, classes and files sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist.")
    entries = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((file, class_dir.name, 0))
    if not entries:
        raise DataError(
            f"Image folder {root} holds no images; expected ROOT/CLASS_NAME/IMAGE files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return entries


def load_entries(
    entries: list[tuple[Path, object, int]],
    image_size: int,
    channels: int,
    skip_bad: bool,
    origin: str,
) -> tuple[torch.Tensor, list, int]:
    """Decode every entry -> (uint8 [N, C, S, S], labels, number skipped). A file that cannot
    be read raises DataError naming it (and its manifest line), or is skipped and counted."""
    images, labels, skipped = [], [], 0
    for file, label, lineno in entries:
        try:
            images.append(load_image(file, image_size, channels))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three on bad files
            if not skip_bad:
                where = f"{origin}, line {lineno}: " if lineno else ""
                reason = (
                    "file does not exist" if not file.exists() else f"cannot read image ({exc})"
                )
                raise DataError(f"{where}{file}: {reason}.") from exc
            skipped += 1
            continue
        labels.append(label)
    if skipped:
        log.warning(
            "Skipped %d unreadable image(s) listed in %s (data.skip_bad_samples=true).",
            skipped,
            origin,
        )
    if not images:
        raise DataError(f"{origin} holds no readable images.")
    return torch.stack(images), labels, skipped


# ----------------------------------------------------------------------------- datasets


class ImageDataset(Dataset):
    """uint8 images [N, C, S, S] + labels [N] -> {"image": float [C, S, S] in [-1, 1], "label"}.
    The transform's random draws are seeded by (seed, the sample's place in the training
    stream), so they are the same after a resume and in any DataLoader worker."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, seed: int = 0):
        self.images, self.labels, self.transform = images, labels, transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]  # [C, S, S] uint8
        if self.transform is not None:
            # torchvision draws from torch's global generator: seed it for this sample alone
            with seeded_torch(sample_seed(self.seed, draw_key(index))):
                image = self.transform(image)  # geometric augmentations on uint8: fill stays 0
        image = image.float() / 127.5 - 1.0  # [-1, 1]
        return {"image": image, "label": self.labels[index]}


def build_augmentation(specs: list[dict] | None):
    """[{"name": "RandomAffine", **kwargs}, ...] -> a torchvision.transforms.v2 pipeline (or None).
    Names are classes of torchvision.transforms.v2; the kwargs are theirs."""
    if not specs:
        return None
    transforms = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(v2, str(name), None)
        if not isinstance(cls, type):
            raise ConfigError(
                f"data.augment: {name!r} is not a torchvision.transforms.v2 transform "
                "(e.g. RandomAffine, RandomResizedCrop, ColorJitter)."
            )
        try:
            transforms.append(cls(**spec))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data.augment: {name}({spec}) is invalid: {exc}") from exc
    return v2.Compose(transforms)


# The digits' split: the vision stage's, and the one the fusion and review stages' digit
# images follow, so that no stage trains on another's held-out images. The split seed is
# also the configs' top-level `split_seed` (configs/train.yaml).
DIGITS_VAL_FRACTION = DIGITS_TEST_FRACTION = 0.15
DIGITS_SPLIT_SEED = 42


def digits_split(labels: list[int], split: str, split_seed: int) -> np.ndarray:
    """The indices of one split of the digits, as the vision stage draws it by default."""
    return stratified_split(labels, DIGITS_VAL_FRACTION, DIGITS_TEST_FRACTION, split_seed)[split]


def stratified_split(
    labels: list[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of a fixed train/val/test split with every class in proportion (by seed)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    held_out = val_fraction + test_fraction
    if held_out <= 0:
        return {"train": index, "val": index[:0], "test": index[:0]}
    # stratify when every class has enough members to appear in each split
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 3 else None
    train, rest = train_test_split(index, test_size=held_out, random_state=seed, stratify=stratify)
    if test_fraction <= 0:
        return {"train": train, "val": rest, "test": rest[:0]}
    if val_fraction <= 0:
        return {"train": train, "val": rest[:0], "test": rest}
    rest_labels = np.asarray(labels)[rest]
    rest_counts = np.bincount(rest_labels)
    stratify = (
        rest_labels if stratify is not None and rest_counts[rest_counts > 0].min() >= 2 else None
    )
    val, test = train_test_split(
        rest, test_size=test_fraction / held_out, random_state=seed, stratify=stratify
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


# ----------------------------------------------------------------------------- module


class ImageDataModule(HerdDataModule):
    """Labelled images for classification (see the module docstring for the sources).

    Args:
        source: digits | folder | manifest.
        path: the image folder (source=folder) or the JSONL manifest (source=manifest).
        image_size: square side the images are resized to (the encoder's img_size).
        channels: 1 (grayscale) or 3 (RGB): the encoder's in_chans.
        num_classes: classes the model predicts; the data's labels must fit in it.
        batch_size, num_workers: DataLoader settings.
        val_fraction, test_fraction: held-out shares of the stratified split; None: 0.15
            each, the only split source=digits takes (the later stages' images follow it).
        augment: training augmentations, [{"name": TRANSFORM, **kwargs}] of
            torchvision.transforms.v2 (on uint8 images); null for none.
        skip_bad_samples: skip and count bad manifest lines and unreadable images instead
            of stopping with an error.
        seed: fixes the shuffling.
        split_seed: fixes the split, apart from `seed` so that a seed sweep keeps one test
            set and the fusion stage sees the vision stage's split.
    """

    def __init__(
        self,
        source: str = "digits",
        path: str | None = None,
        image_size: int = ImageEncoderConfig.img_size,
        channels: int = ImageEncoderConfig.in_chans,
        num_classes: int = 10,
        batch_size: int = 64,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        augment: list | None = None,
        skip_bad_samples: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = DIGITS_SPLIT_SEED,
    ):
        super().__init__()
        augment = plain(augment)  # checkpoints must load with weights_only=True
        self.save_hyperparameters()
        check_source(source, SOURCES, path, ("folder", "manifest"), "path", "its images")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB).")
        digits_fractions = (DIGITS_VAL_FRACTION, DIGITS_TEST_FRACTION)
        given = (val_fraction, test_fraction)
        if source == "digits" and any(
            f is not None and f != d for f, d in zip(given, digits_fractions, strict=True)
        ):
            raise ConfigError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction}: the "
                "embedded digits are split 0.15 / 0.15 for every stage (the fusion stage's images "
                "follow the vision stage's split); leave both unset, or change data.split_seed."
            )
        val_fraction, test_fraction = (
            d if f is None else f for f, d in zip(given, digits_fractions, strict=True)
        )
        self.hparams.update(val_fraction=val_fraction, test_fraction=test_fraction)
        if not (
            0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise ConfigError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be "
                "in [0, 1) and leave something to train on."
            )
        self.augmentation = build_augmentation(augment)  # fail on a bad spec before any work
        self.class_names: list[str] = []
        self.num_skipped = 0

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> tuple[torch.Tensor, list[int]]:
        hp = self.hparams
        if hp.source == "digits":
            images, labels, self.class_names = digits_images(hp.image_size, hp.channels)
            return images, labels
        if hp.source == "folder":
            entries, origin = folder_entries(hp.path), str(hp.path)
        else:
            entries, origin = read_image_manifest(hp.path, hp.skip_bad_samples), str(hp.path)
            if not entries:
                raise DataError(f"Manifest {hp.path} holds no usable image samples.")
        images, raw_labels, self.num_skipped = load_entries(
            entries, hp.image_size, hp.channels, hp.skip_bad_samples, origin
        )
        labels, self.class_names = self._label_ids(raw_labels)
        return images, labels

    def _label_ids(self, raw: list) -> tuple[list[int], list[str]]:
        """Integer labels are class ids; names are numbered in sorted order."""
        if all(isinstance(x, int) for x in raw):
            n = max(raw) + 1
            return list(raw), [str(i) for i in range(n)]
        names = sorted({str(x) for x in raw})
        ids = {name: i for i, name in enumerate(names)}
        return [ids[str(x)] for x in raw], names

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        images, labels = self._read()
        n_classes = len(self.class_names)
        if n_classes > hp.num_classes:
            raise ConfigError(
                f"The data holds {n_classes} classes but the model predicts data.num_classes="
                f"{hp.num_classes}; set data.num_classes={n_classes}."
            )
        self.class_names += [str(i) for i in range(n_classes, hp.num_classes)]
        splits = stratified_split(labels, hp.val_fraction, hp.test_fraction, hp.split_seed)
        label_tensor = torch.tensor(labels, dtype=torch.long)
        for name, index in splits.items():
            index = torch.from_numpy(index)
            transform = self.augmentation if name == "train" else None
            self.datasets[name] = ImageDataset(
                images[index], label_tensor[index], transform, hp.seed
            )
        if len(self.datasets["train"]) < hp.batch_size:
            raise ConfigError(
                f"The training split holds {len(self.datasets['train'])} images, fewer than "
                f"data.batch_size={hp.batch_size}; lower the batch size or add data."
            )
        if not len(self.datasets["val"]):
            raise ConfigError("The validation split is empty; raise data.val_fraction.")

    # -- loaders ----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        # endless shuffled passes, sharded over ranks, positioned after the steps already
        # taken (a resumed run continues mid-epoch)
        size, batch = len(self.datasets["train"]), self.hparams.batch_size
        return self.loader(
            "train", sampler=resumable_train_sampler(self, size, batch), drop_last=True
        )

    # -- for logs and callbacks -------------------------------------------------------------

    def sample_batch(self, split: str = "val", n: int = 16) -> dict:
        """The first n images of a split (no augmentation), as a batch."""
        self.setup("fit")
        dataset = self.datasets[split]
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        return {
            "image": torch.stack([it["image"] for it in items]),
            "label": torch.stack([it["label"] for it in items]),
        }

    def reference_metrics(self) -> dict[str, float]:
        """Trivial baselines for metrics.json: always answering the training split's most
        frequent class (top-1), or its five most frequent (top-5), scored on the test split."""
        self.setup("fit")
        split = "test" if len(self.datasets["test"]) else "val"
        train = self.datasets["train"].labels
        target = self.datasets[split].labels
        order = torch.bincount(train, minlength=self.hparams.num_classes).argsort(descending=True)
        hits_top1 = (target == order[0]).float().mean()
        hits_top5 = torch.isin(target, order[:5]).float().mean()
        return {f"{split}/chance_top1": float(hits_top1), f"{split}/chance_top5": float(hits_top5)}


__all__ = ["ImageDataModule", "load_image", "read_image_manifest"]
