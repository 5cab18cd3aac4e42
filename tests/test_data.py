"""Tests for elastictrain.data: the GPU-resident loader (run here on the CPU) and the dataset readers.

The loader tests use a synthetic Split whose pixels say where they came from, so every output pixel
can be traced back exactly: channel 0 holds 1 + row * W + col (1..100), channel 1 holds
101 + index % 100 and channel 2 holds 201 + index // 100. Zero only ever comes from padding.
The real-data tests read $ELASTICTRAIN_DATA through elastictrain.data and skip when it is absent.
"""
import urllib.error
from collections import Counter

import pytest
import torch
import torchvision

from elastictrain import data as D
from elastictrain.data import DatasetMissingError, GpuLoader, Split, load_split

H = W = 10
PAD = 4


def synthetic_split(n, labels=None):
    idx = torch.arange(n)
    pos = 1 + torch.arange(H * W).view(1, H, W).expand(n, H, W)
    images = torch.stack([pos,
                          (101 + idx % 100).view(n, 1, 1).expand(n, H, W),
                          (201 + idx // 100).view(n, 1, 1).expand(n, H, W)], 1).to(torch.uint8)
    assert n <= 5500  # channel 2 must stay below 256
    return Split(images, idx.clone() if labels is None else labels, f"synthetic[{n}]")


def decode_crop(x, padded):
    """(dy, dx, flipped) such that ``x`` is exactly padded[:, dy:dy+H, dx:dx+W] (mirrored if
    flipped) divided by 255; raises AssertionError when no such crop reproduces ``x``."""
    v = torch.round(x[0] * 255).long()
    nz = (v > 0).nonzero()
    assert len(nz) > 0, "every crop must overlap the image"
    i, j = nz[0].tolist()
    r, c = divmod(int(v[i, j]) - 1, W)
    same_row = nz[nz[:, 0] == i][:, 1]
    j2 = int(same_row[-1])
    assert j2 != j, "a crop shows at least PAD + 2 columns of the image"
    c2 = (int(v[i, j2]) - 1) % W
    flipped = (c2 - c) * (j2 - j) < 0
    dy = r + PAD - i
    dx = c + PAD - ((W - 1 - j) if flipped else j)
    assert 0 <= dy <= 2 * PAD and 0 <= dx <= 2 * PAD, (dy, dx)
    crop = padded[:, dy:dy + H, dx:dx + W]
    if flipped:
        crop = crop.flip(-1)
    expected = crop.to(torch.float32).div_(255)
    assert torch.equal(x, expected), f"output differs from crop ({dy}, {dx}, flipped={flipped})"
    return dy, dx, flipped


def collect(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------- crop / flip

def test_train_crop_flip_is_exact():
    split = synthetic_split(600)
    padded = torch.nn.functional.pad(split.images, (PAD, PAD, PAD, PAD))  # zeros around the image
    loader = GpuLoader(split, 512, train=True, crop_pad=PAD, flip=True, seed=3)
    assert len(loader) == 1
    batches = list(loader)
    assert len(batches) == 1
    x, y = batches[0]
    assert x.shape == (512, 3, H, W) and y.shape == (512,)
    assert len(set(y.tolist())) == 512  # 512 distinct images
    offsets = [decode_crop(x[b], padded[int(y[b])]) for b in range(512)]
    dys, dxs, flips = zip(*offsets)
    assert set(dys) == set(range(2 * PAD + 1))
    assert set(dxs) == set(range(2 * PAD + 1))
    n_flipped = sum(flips)
    assert 0.35 * 512 < n_flipped < 0.65 * 512
    # at least one crop overlaps padding, and there it is exactly zero
    border = x[:, :, 0, :]
    assert (border == 0).any() and (border > 0).any()


def test_decode_crop_rejects_a_wrong_crop():
    """The checker itself can fail: a shifted-by-one crop does not pass as the one it claims."""
    split = synthetic_split(1)
    padded = torch.nn.functional.pad(split.images, (PAD, PAD, PAD, PAD))[0]
    good = padded[:, 2:2 + H, 3:3 + W].float() / 255
    assert decode_crop(good, padded) == (2, 3, False)
    assert decode_crop(good.flip(-1), padded) == (2, 3, True)
    bad = good.clone()
    bad[1, 5, 5] = 0  # a zero inside the image
    with pytest.raises(AssertionError):
        decode_crop(bad, padded)


def test_crop_without_flip_never_mirrors():
    split = synthetic_split(300)
    padded = torch.nn.functional.pad(split.images, (PAD, PAD, PAD, PAD))
    x, y = next(iter(GpuLoader(split, 256, train=True, crop_pad=PAD, flip=False, seed=0)))
    assert not any(decode_crop(x[b], padded[int(y[b])])[2] for b in range(len(y)))


def test_flip_without_crop():
    split = synthetic_split(300)
    x, y = next(iter(GpuLoader(split, 256, train=True, crop_pad=0, flip=True, seed=0)))
    src = split.images[y].float() / 255
    is_same = [torch.equal(x[b], src[b]) for b in range(256)]
    is_flip = [torch.equal(x[b], src[b].flip(-1)) for b in range(256)]
    assert all(a != b for a, b in zip(is_same, is_flip))  # exactly one of the two, never a shift
    assert 0 < sum(is_flip) < 256


# ------------------------------------------------------------------------------ order, batches

def test_eval_loader_returns_images_unchanged_in_order():
    split = synthetic_split(600)
    loader = GpuLoader(split, 256, train=False, crop_pad=PAD, flip=True)  # eval ignores both
    assert len(loader) == 3
    sizes = [len(y) for _, y in loader]
    assert sizes == [256, 256, 88]
    x, y = collect(loader)
    assert torch.equal(y, torch.arange(600))
    assert torch.equal(x, split.images.float() / 255)


def test_eval_loader_without_padding():
    split = synthetic_split(10)
    loader = GpuLoader(split, 4, train=False)
    assert len(loader) == 3
    x, y = collect(loader)
    assert torch.equal(x, split.images.to(torch.float32).div(255)) and torch.equal(y, torch.arange(10))


def test_train_loader_drops_last_partial_batch():
    split = synthetic_split(600)
    loader = GpuLoader(split, 256, train=True)
    assert len(loader) == 2
    assert [len(y) for _, y in loader] == [256, 256]
    assert len(GpuLoader(split, 256, train=True, drop_last=False)) == 3
    assert len(GpuLoader(split, 1000, train=True)) == 0
    assert list(GpuLoader(split, 1000, train=True)) == []


def test_each_epoch_is_a_permutation():
    split = synthetic_split(600)
    loader = GpuLoader(split, 200, train=True, crop_pad=0, flip=False, seed=0)
    epochs = []
    for _ in range(3):
        x, y = collect(loader)
        assert torch.equal(torch.sort(y).values, torch.arange(600))  # every index exactly once
        assert torch.equal(x, split.images[y].float() / 255)  # images travel with their labels
        epochs.append(y)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert not torch.equal(epochs[0], torch.arange(600))


def test_label_multiset_preserved():
    labels = torch.arange(500) % 7
    split = synthetic_split(500, labels=labels)
    _, y = collect(GpuLoader(split, 100, train=True, crop_pad=PAD, flip=True, seed=5))
    assert Counter(y.tolist()) == Counter(labels.tolist())
    assert not torch.equal(y, labels)


def test_same_seed_same_batches_different_seed_different():
    split = synthetic_split(600)

    def run(seed):
        loader = GpuLoader(split, 128, train=True, crop_pad=PAD, flip=True, seed=seed)
        return [b for _ in range(2) for b in loader]

    a, b, c = run(7), run(7), run(8)
    assert len(a) == len(b) == len(c) == 8
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_output_dtype_range_and_layout():
    split = synthetic_split(300)
    for loader in (GpuLoader(split, 128, train=True, crop_pad=PAD, flip=True),
                   GpuLoader(split, 128, train=False)):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
        codes = torch.round(x * 255)
        assert torch.equal(x, codes.to(torch.uint8).float() / 255)  # values are exactly uint8 / 255


def test_bfloat16_dtype_option():
    split = synthetic_split(20)
    x, _ = next(iter(GpuLoader(split, 20, train=False, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16 and x.shape == (20, 3, H, W)


def test_split_subset():
    split = synthetic_split(50)
    sub = split.subset(7)
    assert len(sub) == 7 and sub.name == "synthetic[50][:7]"
    assert torch.equal(sub.images, split.images[:7])


# --------------------------------------------------------------------------- real data sets

def _load(dataset, train):
    root = D.data_root()
    folder = root / ("cifar-10-batches-py" if dataset == "cifar10" else "MNIST")
    if not folder.is_dir():
        pytest.skip(f"{dataset} not found at {folder} (set ELASTICTRAIN_DATA to the torchvision data root)")
    try:
        return load_split(dataset, train)
    except DatasetMissingError as e:
        pytest.skip(f"{dataset} not usable under {root}: {e}")


@pytest.fixture(scope="module")
def cifar_test():
    return _load("cifar10", False)


def test_cifar10_test_split(cifar_test):
    assert cifar_test.images.shape == (10000, 3, 32, 32)
    assert cifar_test.images.dtype == torch.uint8
    assert cifar_test.labels.dtype == torch.int64
    assert cifar_test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(cifar_test.labels).tolist() == [1000] * 10
    assert cifar_test.name == "cifar10/test"


def test_cifar10_train_split():
    s = _load("cifar10", True)
    assert s.images.shape == (50000, 3, 32, 32) and s.images.dtype == torch.uint8
    assert s.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert torch.bincount(s.labels).tolist() == [5000] * 10


def test_cifar10_loader_layout(cifar_test):
    x, y = next(iter(GpuLoader(cifar_test.subset(64), 64, train=False)))
    assert x.shape == (64, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, cifar_test.images[:64].float() / 255)
    assert y.tolist()[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_mnist_splits():
    tr = _load("mnist", True)
    assert tr.images.shape == (60000, 1, 28, 28) and tr.images.dtype == torch.uint8
    assert tr.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    te = _load("mnist", False)
    assert te.images.shape == (10000, 1, 28, 28)
    assert te.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_make_loaders_mnist_subsets():
    _load("mnist", False)  # skip when absent
    train, test = D.make_loaders("mnist", batch_size=100, eval_batch_size=300, train_subset=1000,
                                 test_subset=500)
    assert (train.pad, train.flip, len(train), len(test)) == (0, False, 10, 2)
    assert [len(y) for _, y in test] == [300, 200]
    x, _ = next(iter(train))
    assert x.shape == (100, 1, 28, 28)


# ------------------------------------------------------------------------------ missing data

@pytest.mark.parametrize("dataset,cls", [("cifar10", "CIFAR10"), ("mnist", "MNIST")])
def test_missing_dataset_raises_with_directory_and_hint(tmp_path, monkeypatch, dataset, cls):
    def offline(self):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("ELASTICTRAIN_DATA", str(tmp_path))
    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", offline)
    assert D.data_root() == tmp_path
    with pytest.raises(DatasetMissingError) as exc:
        load_split(dataset, train=False)
    msg = str(exc.value)
    assert str(tmp_path.resolve()) in msg
    assert "prepare" in msg and "ELASTICTRAIN_DATA" in msg and "offline" in msg
    assert isinstance(exc.value.__cause__, urllib.error.URLError)
    assert isinstance(exc.value, FileNotFoundError)


def test_unknown_dataset_raises_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_split("svhn", train=True)


def test_imagenet_folder_missing(tmp_path):
    with pytest.raises(DatasetMissingError) as exc:
        D.imagenet_folder(tmp_path, "train")
    assert "train/<class>" in str(exc.value)
    assert str((tmp_path / "train").resolve()) in str(exc.value)
    (tmp_path / "val").mkdir()  # an empty split folder is just as missing
    with pytest.raises(DatasetMissingError, match="train/<class>"):
        D.imagenet_folder(tmp_path, "val")


def test_imagenet_folder_reads_a_tiny_image_folder(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for k, cls in enumerate(("n001", "n002")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for j, size in enumerate(((300, 260), (180, 240))):
                Image.new("RGB", size, (40 * k + 10 * j, 100, 200)).save(d / f"img{j}.png")
    for split in ("train", "val"):
        ds = D.imagenet_folder(tmp_path, split)
        assert len(ds) == 4
        assert ds.classes == ["n001", "n002"]
        samples = [ds[i] for i in range(4)]
        assert [tuple(x.shape) for x, _ in samples] == [(3, 224, 224)] * 4
        assert [y for _, y in samples] == [0, 0, 1, 1]
        assert all(0.0 <= float(x.min()) and float(x.max()) <= 1.0 for x, _ in samples)
    # val is deterministic (Resize + CenterCrop) and the colour is kept: G = 100/255, B = 200/255
    x, _ = D.imagenet_folder(tmp_path, "val")[0]
    assert torch.allclose(x[1], torch.full((224, 224), 100 / 255), atol=1e-6)
    assert torch.allclose(x[2], torch.full((224, 224), 200 / 255), atol=1e-6)
