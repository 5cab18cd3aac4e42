"""ImageNet from a standard ImageFolder root, for one process or one process per GPU (torchrun).

Layout: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (the val images sorted
into class folders). Transforms as in CUP and the PyTorch ImageNet example (cup.md §2.1): train
RandomResizedCrop(224, scale 0.08–1, ratio 3/4–4/3) + horizontal flip, val Resize(256) +
CenterCrop(224); ImageNet normalisation is the model's first layer, so images leave here in [0, 1].

Two choices make a run independent of how many processes read the data:

* every random draw of a training image (crop box, flip) comes from ``(seed, epoch, index)``, not
  from a worker's RNG, so the same image gets the same crop whichever worker or rank decodes it,
  and a resumed run sees exactly the data the uninterrupted one would have seen;
* every rank draws the same permutation per epoch and takes its own contiguous slice of each
  global batch, so the union of the ranks' i-th batches is the i-th batch of a single process
  reading with the global batch size (rank r holds part r, what ``TrainConfig.bn_splits`` mimics).

Workers decode JPEGs and return uint8 tensors (4× less to move than float); the loader converts
on the device.
"""
import math
import random
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .data import DatasetMissingError

LAYOUT = ("<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (one folder per class, as "
          "torchvision's ImageFolder reads them)")
VAL_HINT = ("The official val images come in one flat folder: sort them into class folders first "
            "(e.g. with the PyTorch ImageNet example's valprep.sh).")


def check_split(root, split: str) -> Path:
    """``root/split`` if it has at least one class folder holding an image, else DatasetMissingError."""
    root = Path(root).expanduser()
    folder = root / split
    classes = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes or not any(f.is_file() for c in classes for f in c.iterdir()):
        what = ("does not exist" if not root.is_dir() else "has no class folders" if not classes
                else "has class folders but no images")
        raise DatasetMissingError(
            f"no ImageNet {split} split at {folder.resolve()} ({folder.name} {what}): expected {LAYOUT}. "
            f"{VAL_HINT} Pass that root with --data (scripts/train_imagenet.py) or IMAGENET (notebooks).")
    return folder


def _crop_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (torchvision's algorithm: 10 tries, then a central crop), drawn from ``rng``."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    if w / h < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class ImageFolderSplit(Dataset):
    """One split of an ImageFolder root with the standard ImageNet transforms at ``image_size``
    (val resizes to ``image_size · 256/224`` first). Items are ``(image, label)``; the key is an
    index or ``(epoch, index)``. Images are uint8 CHW, or ``dtype`` scaled to [0, 1]."""

    def __init__(self, root, split: str, *, image_size: int = 224, seed: int = 0, dtype=torch.uint8):
        from torchvision.datasets import ImageFolder
        folder = check_split(root, split)
        try:
            self.folder = ImageFolder(str(folder))
        except FileNotFoundError as e:  # a class folder without any image file
            raise DatasetMissingError(f"{folder.resolve()}: {e}; expected {LAYOUT}") from e
        self.train, self.size, self.seed, self.dtype = split == "train", image_size, seed, dtype
        self.resize = round(image_size * 256 / 224)

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        img, label = self.folder[i]
        if self.train:
            rng = random.Random(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
            top, left, h, w = _crop_box(*img.size, rng)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if rng.random() < 0.5:
                img = TF.horizontal_flip(img)
        else:
            img = TF.center_crop(TF.resize(img, self.resize, antialias=True), [self.size, self.size])
        x = TF.pil_to_tensor(img)
        return (x if self.dtype == torch.uint8 else x.to(self.dtype).div_(255)), label


class GlobalBatches:
    """Training batch sampler: per epoch one permutation drawn from ``(seed, epoch)`` (the same on
    every rank), cut into global batches of ``batch_size · world``; rank r yields part r of each.
    Incomplete global batches are dropped."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch = 0

    def __len__(self):
        return self.n // (self.batch_size * self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.n, generator=g).tolist()
        b, step = self.batch_size, self.batch_size * self.world
        for i in range(len(self)):
            start = i * step + self.rank * b
            yield [(self.epoch, j) for j in order[start:start + b]]


class ShardBatches:
    """Evaluation batch sampler: rank r reads images r, r + world, ... in order, without the padding
    DistributedSampler adds, so counts summed over ranks cover every image exactly once."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1):
        self.mine, self.batch_size = range(rank, n, world), batch_size

    def __len__(self):
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            yield [(0, j) for j in self.mine[i * self.batch_size:(i + 1) * self.batch_size]]


class FolderLoader:
    """What ``fit`` and ``evaluate`` need from a loader: ``len()``, ``(x, y)`` batches on ``device``
    (x float [0, 1], channels_last on CUDA), ``set_epoch`` (called by ``fit`` before each epoch) and
    ``sharded`` (True when each rank sees only its part, so ``evaluate`` sums counts over ranks)."""

    def __init__(self, dataset: ImageFolderSplit, batch_size: int, *, device, workers: int = 4, seed: int = 0):
        self.dataset, self.device = dataset, torch.device(device)
        rank, world = distributed.rank(), distributed.world_size()
        self.sharded = world > 1
        self.batches = (GlobalBatches(len(dataset), batch_size, rank=rank, world=world, seed=seed) if dataset.train
                        else ShardBatches(len(dataset), batch_size, rank=rank, world=world))
        # The batch sampler runs in this process, so set_epoch reaches it even with persistent workers.
        self.loader = DataLoader(dataset, batch_sampler=self.batches, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None)

    def set_epoch(self, epoch: int):
        self.batches.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x.float().div_(255), y.to(self.device, non_blocking=True)


def make_loaders(root, *, batch_size: int, eval_batch_size: int | None = None, image_size: int = 224,
                 workers: int = 4, seed: int = 0, device="cpu") -> tuple[FolderLoader, FolderLoader]:
    """Train and val loaders over ``root``; ``batch_size`` is per rank (the global batch is
    ``world_size × batch_size``). Both splits are checked before anything is read."""
    for split in ("train", "val"):
        check_split(root, split)
    train = ImageFolderSplit(root, "train", image_size=image_size, seed=seed)
    val = ImageFolderSplit(root, "val", image_size=image_size)
    if train.classes != val.classes:
        raise DatasetMissingError(f"{root}: train has {len(train.classes)} class folders and val "
                                  f"{len(val.classes)}, or their names differ; both need the same classes")
    return (FolderLoader(train, batch_size, device=device, workers=workers, seed=seed),
            FolderLoader(val, eval_batch_size or batch_size, device=device, workers=workers))


def make_synthetic_imagefolder(root, classes: int = 4, per_class: int = 8, size: int = 64, seed: int = 0,
                               val_per_class: int | None = None) -> Path:
    """A tiny learnable stand-in for ImageNet (tests, smoke runs, the DDP proof): per class a
    colour and a stripe orientation, plus noise, saved as JPEGs whose widths vary (so crops and
    resizes are exercised). Returns ``root``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    yy, xx = np.mgrid[0:size, 0:size + 16] / size
    for split, n in (("train", per_class), ("val", val_per_class or max(1, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.uniform(40, 215, 3)
            angle = math.pi * c / classes
            stripes = 40 * np.sin(2 * math.pi * 3 * (np.cos(angle) * xx + np.sin(angle) * yy))
            for j in range(n):
                w = size + 8 * (j % 3)
                pixels = colour + stripes[:, :w, None] + rng.normal(0, 20, (size, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{j:04d}.JPEG", quality=90)
    return root
