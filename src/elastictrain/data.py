"""Datasets and the GPU-resident training loader.

CIFAR-10 and MNIST come only through ``torchvision.datasets`` (``download=True``) under the root in
``$ELASTICTRAIN_DATA`` (default ``./data``), so the md5 checks of torchvision guard their integrity.
Training keeps the whole split on the device as one uint8 tensor and does random crop + flip there
with a single gather per batch: no DataLoader workers, no host round trip. On an H100 this pipeline
costs < 0.2 s per CIFAR epoch, so the model step dominates (README, benchmark).
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SHARED_PREPARE_HINT = ("On a machine without network, materialise the official files with "
                       "`../shared/data/prepare <root> cifar10 mnist` and point ELASTICTRAIN_DATA at <root>.")


class DatasetMissingError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable."""


def data_root(root=None) -> Path:
    return Path(root or os.environ.get("ELASTICTRAIN_DATA") or "./data").expanduser()


@dataclass(frozen=True)
class Split:
    """A whole split as tensors: images uint8 [N, C, H, W], labels int64 [N]."""
    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __len__(self):
        return len(self.labels)

    def subset(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n], f"{self.name}[:{n}]")


def _torchvision(cls_name, root, train):
    import torchvision
    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(str(root), train=train, download=True)
    except Exception as e:  # URLError, RuntimeError("Dataset not found or corrupted"), md5 failures
        raise DatasetMissingError(
            f"{cls_name} ({'train' if train else 'test'}) is not under {root.resolve()} and could not be "
            f"downloaded ({type(e).__name__}: {e}). Set ELASTICTRAIN_DATA to a folder holding the "
            f"torchvision files, or allow the download. {SHARED_PREPARE_HINT}") from e


def load_split(dataset: str, train: bool, root=None) -> Split:
    """Load ``cifar10`` or ``mnist`` (train or test) as uint8 tensors in NCHW order."""
    root = data_root(root)
    split = "train" if train else "test"
    if dataset == "cifar10":
        ds = _torchvision("CIFAR10", root, train)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # NHWC numpy -> NCHW view
        labels = torch.tensor(ds.targets, dtype=torch.int64)
    elif dataset == "mnist":
        ds = _torchvision("MNIST", root, train)
        images, labels = ds.data.unsqueeze(1), ds.targets.to(torch.int64)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected 'cifar10' or 'mnist' "
                         "(ImageNet is read with elastictrain.imagenet.make_loaders)")
    return Split(images, labels, f"{dataset}/{split}")


class GpuLoader:
    """Batches of a ``Split`` held on ``device``, with seeded random crop and horizontal flip.

    Images are stored padded and channels-last ([N, H+2p, W+2p, C] uint8), so one advanced-indexing
    gather both crops and flips, and ``permute`` hands the model a channels_last NCHW tensor for free.
    Yields ``(x, y)`` with ``x`` in [0, 1] of ``dtype``.
    """

    def __init__(self, split: Split, batch_size: int, *, train: bool, crop_pad: int = 0,
                 flip: bool = False, seed: int = 0, device="cpu", dtype=torch.float32,
                 drop_last: bool | None = None):
        self.batch_size, self.train, self.pad, self.flip = batch_size, train, crop_pad, flip
        self.dtype, self.device = dtype, torch.device(device)
        self.drop_last = train if drop_last is None else drop_last
        self.labels = split.labels.to(self.device)
        x = split.images.to(self.device).permute(0, 2, 3, 1)
        if crop_pad:
            x = torch.nn.functional.pad(x, (0, 0, crop_pad, crop_pad, crop_pad, crop_pad))
        self.images = x.contiguous()
        self.h, self.w = split.images.shape[2:]
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self._batch(idx), self.labels[idx]

    def _batch(self, idx):
        b = len(idx)
        rows = torch.arange(self.h, device=self.device).expand(b, -1)
        cols = torch.arange(self.w, device=self.device).expand(b, -1)
        if self.train and self.pad:
            g = self.generator
            rows = rows + torch.randint(0, 2 * self.pad + 1, (b, 1), device=self.device, generator=g)
            cols = cols + torch.randint(0, 2 * self.pad + 1, (b, 1), device=self.device, generator=g)
        elif self.pad:  # evaluation on a padded store: take the centre
            rows, cols = rows + self.pad, cols + self.pad
        if self.train and self.flip:
            flipped = torch.rand(b, 1, device=self.device, generator=self.generator) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        x = self.images[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        return x.permute(0, 3, 1, 2).to(self.dtype).div_(255)


def make_loaders(dataset: str, *, batch_size: int = 512, eval_batch_size: int = 1000,
                 crop_pad: int | None = None, flip: bool | None = None, seed: int = 0, device="cpu",
                 dtype=torch.float32, root=None, train_subset: int | None = None,
                 test_subset: int | None = None):
    """Train and test loaders for ``cifar10`` (crop 4 + flip by default) or ``mnist`` (none).

    The ``*_subset`` arguments take the first n samples (smoke runs only; never for reported numbers).
    """
    crop_pad = (4 if dataset == "cifar10" else 0) if crop_pad is None else crop_pad
    flip = (dataset == "cifar10") if flip is None else flip
    train, test = load_split(dataset, True, root), load_split(dataset, False, root)
    if train_subset:
        train = train.subset(train_subset)
    if test_subset:
        test = test.subset(test_subset)
    return (GpuLoader(train, batch_size, train=True, crop_pad=crop_pad, flip=flip, seed=seed,
                      device=device, dtype=dtype),
            GpuLoader(test, eval_batch_size, train=False, device=device, dtype=dtype))


def imagenet_folder(root, split: str):
    """ImageNet ``split`` ('train' or 'val') of an ImageFolder root as a dataset of (float image in
    [0, 1], label) with the standard transforms at 224 px: ``imagenet.ImageFolderSplit``, which
    also documents the layout. Training reads it through ``imagenet.make_loaders``."""
    from .imagenet import ImageFolderSplit
    return ImageFolderSplit(root, split, dtype=torch.float32)
