"""Weight sharing: exact k-means, codebooks per group, trained centroids, packed storage."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights
from elastictrain.prune.structure import LAYER, WORKLOAD, blocks
from elastictrain.quant import QuantSpec, bake_, codebooks, kmeans_1d, quantize_, unique_per_group
from elastictrain.storage import byte_report, load_compressed, read_header, save_compressed

WIDTHS = [16, 16, 32, 32, 32, 32, 32, 64, 64, 64, 64, 64, 64]


def sparse_vgg(density=0.05, seed=0):
    torch.manual_seed(seed)
    m = create_model("vgg16", widths=WIDTHS)
    with torch.no_grad():
        for w in prunable_weights(m).values():
            w.mul_(torch.rand(w.shape) < density)
    return m


@pytest.mark.parametrize("bits", [0, 9, 2.5, "4"])
def test_bits_must_be_1_to_8(bits):
    with pytest.raises(ValueError, match="1 to 8"):
        QuantSpec(bits)


def test_exact_kmeans_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10)
    xs = np.sort(x)
    best = min(sum(((xs[a:b] - xs[a:b].mean()) ** 2).sum() for a, b in zip((0,) + s, s + (10,)))
               for s in itertools.combinations(range(1, 10), 3))
    c, lab = kmeans_1d(x, 4)
    assert len(c) == 4 and np.all(np.diff(c) > 0)
    assert ((x - c[lab]) ** 2).sum() == pytest.approx(best, rel=1e-12)
    assert np.array_equal(lab, np.abs(x[:, None] - c[None]).argmin(1))   # nearest centroid


def test_kmeans_is_exact_when_values_are_few():
    c, lab = kmeans_1d([0.5, -1.0, 0.5, 2.0], 4)
    assert c.tolist() == [-1.0, 0.5, 2.0] and lab.tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("spec", [QuantSpec(4, LAYER), QuantSpec(2, WORKLOAD), QuantSpec(1, LAYER)])
def test_quantize_keeps_mask_and_at_most_2_bits_values_per_group(spec):
    m = sparse_vgg()
    before = {n: (w != 0).clone() for n, w in prunable_weights(m).items()}
    quantize_(m, spec)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, before[n]), n
        assert int(unique_per_group(w, spec.structure).max()) <= 2 ** spec.bits
    bake_(m)
    assert not any(".parametrizations." in k for k in m.state_dict())
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, before[n])


def test_workload_groups_have_their_own_codebooks():
    m = sparse_vgg(density=0.3)
    books = quantize_(m, QuantSpec(2, WORKLOAD))
    assert books["features.3.weight"].shape == (64, 4)      # 16 x 4 blocks, 4 levels
    assert books["features.0.weight"].shape == (48, 4)      # conv1: 16 x 3 (C = 3)
    assert books["classifier.weight"].shape == (40, 4)      # linear viewed as [10, 64, 1, 1]: 10 x 4
    w = prunable_weights(m)["features.3.weight"]
    for g, row in enumerate(blocks(w.detach(), WORKLOAD)):
        assert set(row[row != 0].tolist()) <= set(books["features.3.weight"][g].tolist())


def test_centroid_gradient_is_the_sum_of_member_gradients():
    m = sparse_vgg(density=0.2)
    quantize_(m, QuantSpec(3, LAYER))
    conv = m.features[3]
    with parametrize.cached():            # the forward reuses this very tensor, so its grad is kept
        w = conv.weight
        w.retain_grad()
        m.train()(torch.rand(4, 3, 32, 32)).square().sum().backward()
    param = conv.parametrizations.weight.original
    codes = conv.parametrizations.weight[0].codes
    pos = conv.parametrizations.weight[0].positions
    expected = torch.zeros(param.numel()).index_add_(0, codes, w.grad.flatten()[pos])
    assert torch.allclose(param.grad.flatten(), expected, rtol=1e-5, atol=1e-7)


def test_training_moves_centroids_not_the_mask():
    from elastictrain.data import GpuLoader, Split
    from elastictrain.train import TrainConfig, fit
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (256,), generator=g), "tiny")
    m = sparse_vgg()
    mask = {n: (w != 0).clone() for n, w in prunable_weights(m).items()}
    start = {n: b.clone() for n, b in quantize_(m, QuantSpec(2, LAYER)).items()}
    fit(m, GpuLoader(split, 64, train=True), None, TrainConfig(epochs=1, lr=0.05), progress=False)
    moved = codebooks(m)
    assert any(not torch.equal(moved[n], start[n]) for n in start)
    bake_(m)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, mask[n]) and int(unique_per_group(w, LAYER).max()) <= 4


@pytest.mark.parametrize("spec", [QuantSpec(4, LAYER), QuantSpec(2, WORKLOAD)])
def test_packed_storage_round_trip_and_byte_accounting(spec, tmp_path):
    m = sparse_vgg()
    quantize_(m, spec)
    bake_(m)
    path = tmp_path / "q.etm"
    size = save_compressed(m, path, {"bits": spec.bits}, quant=spec)
    back = load_compressed(path)
    a, b = m.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if not k.endswith("num_batches_tracked"))
    report = byte_report(path)
    assert size == report["total"] == path.stat().st_size
    entries = {e["name"]: e for e in read_header(path)["tensors"]}
    weights = prunable_weights(m)
    assert report["codebooks"] == sum(4 * spec.structure.num_blocks(tuple(w.shape)) * 2 ** spec.bits
                                      for w in weights.values())
    assert report["values"] == sum(math.ceil(int((w != 0).sum()) * spec.bits / 8) for w in weights.values())
    assert all(entries[n]["enc"] == "codebook" and entries[n]["bits"] == spec.bits for n in weights)


def test_storage_refuses_unquantized_or_parametrized_models(tmp_path):
    m = sparse_vgg()
    with pytest.raises(ValueError, match="quantize the model first"):
        save_compressed(m, tmp_path / "a.etm", quant=QuantSpec(2))
    quantize_(m, QuantSpec(2))
    with pytest.raises(ValueError, match="bake_"):
        save_compressed(m, tmp_path / "b.etm", quant=QuantSpec(2))
    assert not list(tmp_path.iterdir())
