"""Tests for elastictrain.prune: Structure blocks (spec §2.5, §5.1), LAMP and the per-layer budget
with floors (§5.2), unstructured / kernel / pattern / workload-balanced masks (§5.3–5.7), the
log-cubic density ramp and MaskCallback inside ``fit`` (§5.8), and a smoke run of a table row.

Mask makers run on small synthetic weight dicts; training runs use a small MLP on random
MNIST-shaped images, on the CPU. Only the run_row smoke test needs the CIFAR-10 files.
"""
import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch

from elastictrain.data import GpuLoader, Split
from elastictrain.metrics import count_weights
from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights
from elastictrain.prune import (ANY, EACH, KERNEL, WORKLOAD, MaskCallback, PruneSpec, Structure,
                                density_at, make_masks, pattern_library)
from elastictrain.prune.masks import _floor, allocate, lamp, unconnected
from elastictrain.prune.schedule import _plain_stack
from elastictrain.prune.structure import FILTER, LAYER, as_4d_shape, block_ids, blocks, unblocks
from elastictrain.train import Callback, TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_checkpoints_dir(tmp_path, monkeypatch):
    """load_checkpoint consults checkpoints_dir()/MANIFEST: point it at an empty temp folder."""
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path / "ckpts"))


def synthetic_weights(seed=0):
    """Three 3×3 convs and a classifier, at deliberately different scales (LAMP must not care)."""
    g = torch.Generator().manual_seed(seed)
    return {"conv1": torch.randn(64, 16, 3, 3, generator=g),
            "conv2": torch.randn(128, 64, 3, 3, generator=g) * 0.1,
            "conv3": torch.randn(256, 128, 3, 3, generator=g) * 3.0,
            "fc": torch.randn(10, 256, generator=g) * 0.01}


W = synthetic_weights()
N = sum(w.numel() for w in W.values())          # 380,416
# The floors of W, by the rule in _floor (items = weights here): conv1 10%, convs max(32, 0.02%),
# the classifier 5%; int() then ceiling division.
FLOORS = {"conv1": 921, "conv2": 32, "conv3": 58, "fc": 128}


def counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


# =============================================================================== Structure (§2.5)

@pytest.mark.parametrize("structure, shape, groups", [
    (WORKLOAD, (64, 3, 3, 3), (16, 3, 1, 1)),          # min(4, C=3): conv1 has 48 blocks
    (WORKLOAD, (512, 512, 3, 3), (16, 4, 1, 1)),
    (WORKLOAD, (10, 512), (10, 4, 1, 1)),               # linear viewed as [10, 512, 1, 1]
    (KERNEL, (64, 3, 3, 3), (64, 3, 1, 1)),
    (FILTER, (128, 64, 3, 3), (128, 1, 1, 1)),
    (LAYER, (128, 64, 3, 3), (1, 1, 1, 1)),
    (Structure(EACH, EACH, EACH, EACH), (4, 2, 3, 3), (4, 2, 3, 3)),
    (Structure(EACH, EACH, EACH, ANY), (8, 4, 3, 3), (8, 4, 3, 1)),
    (Structure(ANY, EACH, EACH, EACH), (8, 4, 3, 3), (1, 4, 3, 3)),
    (Structure(2, 2, 3, 1), (8, 4, 3, 3), (2, 2, 3, 1)),
    (Structure(32, 8, 5, 5), (8, 4, 3, 3), (8, 4, 3, 3)),  # min(g, dim) on every dimension
])
def test_groups(structure, shape, groups):
    assert structure.groups(as_4d_shape(shape)) == groups
    assert structure.num_blocks(shape) == math.prod(groups)


def test_workload_block_counts_of_vgg16():
    assert WORKLOAD.num_blocks((64, 3, 3, 3)) == 48
    assert WORKLOAD.num_blocks((64, 64, 3, 3)) == 64
    assert WORKLOAD.num_blocks((512, 512, 3, 3)) == 64
    assert WORKLOAD.num_blocks((10, 512)) == 40
    # §2.5's block sizes: conv1 48 of 36, conv2 64 of 576, conv9-13 64 of 36,864
    assert blocks(torch.zeros(64, 3, 3, 3), WORKLOAD).shape == (48, 36)
    assert blocks(torch.zeros(64, 64, 3, 3), WORKLOAD).shape == (64, 576)
    assert blocks(torch.zeros(512, 512, 3, 3), WORKLOAD).shape == (64, 36864)
    assert blocks(torch.zeros(10, 512), WORKLOAD).shape == (40, 128)


@pytest.mark.parametrize("structure, shape, dim", [
    (WORKLOAD, (24, 8, 3, 3), "filter"),       # 24 filters into 16 groups
    (WORKLOAD, (64, 6, 3, 3), "channel"),      # 6 channels into 4 groups
    (Structure(ANY, ANY, 2, ANY), (4, 4, 3, 3), "row"),
    (Structure(ANY, ANY, ANY, 2), (4, 4, 3, 3), "column"),
    (WORKLOAD, (10, 6), "channel"),
])
def test_uneven_split_raises(structure, shape, dim):
    with pytest.raises(ValueError, match=dim):
        structure.num_blocks(shape)
    with pytest.raises(ValueError, match="equal groups"):
        blocks(torch.zeros(shape), structure)


def test_as_4d_shape_refuses_other_ranks():
    assert as_4d_shape((10, 512)) == (10, 512, 1, 1)
    assert as_4d_shape(torch.Size([8, 4, 3, 3])) == (8, 4, 3, 3)
    with pytest.raises(ValueError, match="conv"):
        as_4d_shape((8, 4, 3))


ROUND_TRIP = [
    (KERNEL, (16, 8, 3, 3)),
    (WORKLOAD, (64, 3, 3, 3)),
    (WORKLOAD, (32, 8, 3, 3)),
    (WORKLOAD, (10, 256)),
    (FILTER, (16, 8, 3, 3)),
    (LAYER, (16, 8, 3, 3)),
    (Structure(EACH, EACH, EACH, ANY), (6, 4, 3, 3)),      # kernel rows
    (Structure(EACH, EACH, ANY, EACH), (6, 4, 3, 3)),      # kernel columns
    (Structure(ANY, EACH, EACH, EACH), (6, 4, 3, 3)),      # GEMM columns
    (Structure(2, 2, 3, 1), (8, 4, 3, 3)),                 # integer groups on rows
    (Structure(4, 1, 1, 3), (8, 4, 3, 3)),                 # integer groups on columns
    (Structure(4, 2, ANY, ANY), (8, 6, 5, 5)),
    (Structure(5, 4, ANY, ANY), (10, 8)),
    (Structure(2, 3, 2, 2), (8, 6, 4, 4)),                 # groups of size > 1 on every dimension
    (Structure(4, 2, 2, 2), (4, 4, 4, 4)),
]


@pytest.mark.parametrize("structure, shape", ROUND_TRIP)
def test_blocks_unblocks_round_trip(structure, shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    b = blocks(w, structure)
    n = structure.num_blocks(shape)
    assert b.shape == (n, w.numel() // n)
    back = unblocks(b, structure, shape)
    assert back.shape == w.shape
    assert torch.equal(back, w)
    # the inverse the other way round too
    b2 = torch.randn(b.shape, generator=g)
    assert torch.equal(blocks(unblocks(b2, structure, shape), structure), b2)


@pytest.mark.parametrize("structure, shape", ROUND_TRIP)
def test_each_block_holds_exactly_its_ids(structure, shape):
    ids = block_ids(shape, structure)
    n = structure.num_blocks(shape)
    assert ids.shape == tuple(shape)
    assert torch.equal(ids.flatten().bincount(), torch.full((n,), ids.numel() // n))
    # blocks() of the id tensor: row g holds only the id g
    assert torch.equal(blocks(ids, structure), torch.arange(n)[:, None].expand(n, ids.numel() // n))
    w = torch.randperm(ids.numel()).reshape(shape).float()   # distinct values
    b = blocks(w, structure)
    for gi in range(n):
        assert torch.equal(b[gi].sort().values, w[ids == gi].sort().values)


def test_kernel_blocks_are_filter_major():
    w = torch.randn(5, 3, 3, 3)
    b = blocks(w, KERNEL)
    assert b.shape == (15, 9)
    for f in range(5):
        for c in range(3):
            assert torch.equal(b[f * 3 + c], w[f, c].flatten())


def test_kernel_row_and_workload_block_contents():
    w = torch.randn(4, 3, 3, 3)
    rows = blocks(w, Structure(EACH, EACH, EACH, ANY))
    assert rows.shape == (36, 3)
    for f in range(4):
        for c in range(3):
            for r in range(3):
                assert torch.equal(rows[(f * 3 + c) * 3 + r], w[f, c, r])
    w = torch.randn(64, 8, 3, 3)
    b = blocks(w, WORKLOAD)                      # 16 × 4 blocks of [4, 2, 3, 3]
    assert b.shape == (64, 72)
    for i in range(16):
        for j in range(4):
            assert torch.equal(b[i * 4 + j], w[4 * i:4 * i + 4, 2 * j:2 * j + 2].flatten())
    cols = blocks(w, Structure(ANY, ANY, ANY, 3))  # one block per kernel column
    for k in range(3):
        assert torch.equal(cols[k], w[:, :, :, k].flatten())


def test_workload_block_ids_of_conv1():
    ids = block_ids((64, 3, 3, 3), WORKLOAD)
    f = torch.arange(64)[:, None, None, None]
    c = torch.arange(3)[None, :, None, None]
    assert torch.equal(ids, (3 * (f // 4) + c).expand(64, 3, 3, 3))
    lin = block_ids((10, 512), WORKLOAD)            # [10, 512]: 10 × 4 blocks of 128 columns
    assert lin.shape == (10, 512)
    assert torch.equal(lin, 4 * torch.arange(10)[:, None] + torch.arange(512)[None, :] // 128)


# =================================================================================== LAMP (§5.2)

def test_lamp_known_values():
    out = lamp(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(out, torch.tensor([1 / 10, 2 / 9, 3 / 7, 4 / 4]))
    # order and shape do not matter: entries are sorted internally and the shape is kept
    out = lamp(torch.tensor([[4.0, 1.0], [3.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.1], [3 / 7, 2 / 9]]))
    assert lamp(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]     # no division by zero


def test_lamp_monotone_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(500, generator=g) ** 2
    out = lamp(s)
    order = s.argsort()
    assert (out[order].diff() >= 0).all()
    assert torch.equal(out.argsort(), order)         # distinct scores: the same ranking
    assert out.max() == 1.0 and out[s.argmax()] == 1.0
    torch.testing.assert_close(lamp(s * 1234.5), out, rtol=1e-5, atol=0)
    torch.testing.assert_close(lamp(s * 1e-6), out, rtol=1e-5, atol=0)


def test_make_masks_scale_invariant_across_layers():
    """LAMP ranks layers on one axis: rescaling a layer (as BN allows) changes no mask."""
    base = make_masks(W, 0.05, PruneSpec())
    scaled = dict(W, conv2=W["conv2"] * 1000.0, fc=W["fc"] * 1e-3)
    for n, m in make_masks(scaled, 0.05, PruneSpec()).items():
        assert torch.equal(m, base[n]), n


# ======================================================================== allocation and floors

def test_floor_rule():
    assert _floor("conv1", 9216, 1, "conv1", False) == 922         # >= 10% of conv1: ceil(921.6)
    assert _floor("conv2", 73728, 1, "conv1", False) == 32         # 0.02% = 14.7 < 32
    assert _floor("conv3", 294912, 1, "conv1", False) == 59        # 0.02% = 58.98, rounded up
    assert _floor("fc", 2560, 1, "conv1", True) == 128             # 5% of the classifier
    assert _floor("fc", 5120, 1, "conv1", True) == 256             # VGG16's: "about 256"
    assert _floor("conv1", 1024, 9, "conv1", False) == 103         # kernels: ceil(921.6 / 9)
    assert _floor("conv2", 8192, 9, "conv1", False) == 4           # ceil(32 / 9)
    assert _floor("tiny", 10, 1, "conv1", False) == 10             # never more than the layer


def test_allocate_respects_budget_and_floors():
    scores = {n: w ** 2 for n, w in W.items()}
    costs = {n: 1 for n in W}
    for budget in (1141, 1500, 20000):
        c = allocate(scores, costs, budget, PruneSpec(), linear={"fc"})
        assert sum(c.values()) == budget
        assert all(c[n] >= FLOORS[n] for n in W)
    with pytest.raises(ValueError, match="floors"):
        allocate(scores, costs, 1140, PruneSpec(), linear={"fc"})
    c = allocate(scores, costs, 1000, PruneSpec(floors=False), linear={"fc"})
    assert sum(c.values()) == 1000
    u = allocate(scores, costs, 38042, PruneSpec(allocation="uniform"))
    assert u == {n: int(w.numel() * 38042 / N) for n, w in W.items()}


def test_erk_allocation_follows_layer_shapes():
    # ERK wants ε·(F + C + kh + kw) weights per layer: 86, 198, 390 and 266 parts for W's layers.
    scores = {n: w ** 2 for n, w in W.items()}
    costs = {n: 1 for n in W}
    shapes = {n: tuple(w.shape) for n, w in W.items()}
    spec = PruneSpec(allocation="erk", floors=False)
    assert allocate(scores, costs, 4700, spec, shapes=shapes) == {"conv1": 430, "conv2": 990, "conv3": 1950,
                                                                 "fc": 1330}
    # conv1's 10% floor (922) binds; the other three share the remaining 3778 by 198 : 390 : 266,
    # i.e. 875.95, 1725.3, 1176.8, and the two weights left by rounding down go to the largest
    # fractions (conv2, fc).
    floored = allocate(scores, costs, 4700, PruneSpec(allocation="erk"), linear={"fc"}, shapes=shapes)
    assert floored == {"conv1": 922, "conv2": 876, "conv3": 1725, "fc": 1177}
    # The classifier holds 2,560 weights: at 9,400 it would want 2,660, so it keeps all, and the
    # 6,840 left go 86 : 198 : 390 (872.76, 2009.4, 3957.8: the two rounded-off weights go to conv3, conv1).
    capped = allocate(scores, costs, 9400, spec, shapes=shapes)
    assert capped["fc"] == 2560 and sum(capped.values()) == 9400
    assert capped == {"conv1": 873, "conv2": 2009, "conv3": 3958, "fc": 2560}
    # A layer is never asked for more than its live (non-zero) items: half the classifier pruned.
    half = dict(scores, fc=scores["fc"] * (torch.arange(2560).view(10, 256) % 2))
    assert allocate(half, costs, 4700, spec, shapes=shapes)["fc"] == 1280


def test_erk_masks_count_and_kernels():
    masks = make_masks(W, 0.0123, PruneSpec(allocation="erk"))
    check_shapes(masks)
    assert sum(counts(masks).values()) == round(0.0123 * N)
    for n, m in masks.items():
        a = W[n].abs()
        assert a[m].min() > a[~m].max(), n
    # Kernel items cost 9 weights: the budget is met in whole kernels (the classifier fills by single weights).
    kernel = make_masks(W, 0.05, PruneSpec("kernel", allocation="erk"))
    assert sum(counts(kernel).values()) == round(0.05 * N)
    for n in ("conv1", "conv2", "conv3"):
        assert counts(kernel)[n] % 9 == 0 and kernel[n].flatten(2).all(2).sum() * 9 == counts(kernel)[n]


# ============================================================================= make_masks (§5.3–5.7)

def check_shapes(masks, weights=W):
    assert list(masks) == list(weights)
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == weights[n].shape, n


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.004])
def test_unstructured_exact_count(density):
    masks = make_masks(W, density, PruneSpec())
    check_shapes(masks)
    assert sum(counts(masks).values()) == round(density * N)
    # within each layer, the kept entries are the layer's largest |w|
    for n, m in masks.items():
        a = W[n].abs()
        if m.any() and (~m).any():
            assert a[m].min() > a[~m].max(), n


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_kernel_granularity(density):
    masks = make_masks(W, density, PruneSpec("kernel"))
    check_shapes(masks)
    budget = round(density * N)
    total = sum(counts(masks).values())
    assert budget - 9 < total <= budget          # budget is an upper bound; a kernel costs 9
    for n in ("conv1", "conv2", "conv3"):
        k = masks[n].flatten(2)
        assert torch.equal(k.all(2), k.any(2)), n  # whole 3×3 kernels only
        # the kept kernels have the largest energy in their layer
        e = (W[n] ** 2).flatten(2).sum(2)
        kept = k.any(2)
        if kept.any() and (~kept).any():
            assert e[kept].min() > e[~kept].max(), n
    # the classifier stays per weight: top-k by |w| and, at these counts, not a whole-row pattern
    m, a = masks["fc"], W["fc"].abs()
    assert a[m].min() > a[~m].max()
    assert 0 < int(m.sum()) < m.numel()


def test_pattern_granularity():
    lib = pattern_library(W)
    for density in (0.2, 0.02):
        masks = make_masks(W, density, PruneSpec("pattern"), library=lib)
        check_shapes(masks)
        budget = round(density * N)
        total = sum(counts(masks).values())
        assert budget - 4 < total <= budget       # a pattern kernel costs its 4 entries
        for n in ("conv1", "conv2", "conv3"):
            k = masks[n].flatten(2)               # [F, C, 9]
            kept = k[k.any(2)]
            assert len(kept) > 0
            assert (kept.sum(1) == 4).all() and kept[:, 4].all(), n
            # every surviving support is exactly one library row ...
            match = (kept[:, None, :] == lib[None, :, :]).all(2)
            assert (match.sum(1) == 1).all(), n
            # ... the one holding the most energy in that kernel
            e = (W[n] ** 2).flatten(2)[k.any(2)]
            best = (e @ lib.T.float()).argmax(1)
            assert torch.equal(match.float().argmax(1), best), n
        m, a = masks["fc"], W["fc"].abs()
        assert a[m].min() > a[~m].max()


@pytest.mark.parametrize("granularity", ["unstructured", "kernel"])
@pytest.mark.parametrize("density", [0.3, 0.05, 0.01])
def test_balanced_workload(granularity, density):
    masks = make_masks(W, density, PruneSpec(granularity, balanced=WORKLOAD))
    check_shapes(masks)
    assert sum(counts(masks).values()) <= round(density * N)
    for n, m in masks.items():
        if granularity == "kernel" and m.dim() == 4:
            k = m.flatten(2)
            assert torch.equal(k.all(2), k.any(2)), n
            per_block = blocks(k.any(2).float(), WORKLOAD).sum(1)    # kernels per block
        else:
            per_block = blocks(m.float(), WORKLOAD).sum(1)
        assert len(per_block) == WORKLOAD.num_blocks(m.shape)
        assert per_block.min() >= 1 and (per_block == per_block[0]).all(), (n, per_block.unique())
    # within each block the kept entries are that block's largest
    b, keep = blocks(W["conv2"].abs(), WORKLOAD), blocks(masks["conv2"], WORKLOAD)
    if granularity == "unstructured":
        for row, k in zip(b, keep):
            assert row[k].min() > row[~k].max()


def test_balanced_count_is_the_layer_count_rounded_down():
    plain = counts(make_masks(W, 0.05, PruneSpec()))
    bal = counts(make_masks(W, 0.05, PruneSpec(balanced=WORKLOAD)))
    for n, w in W.items():
        g = WORKLOAD.num_blocks(w.shape)
        assert bal[n] == plain[n] // g * g, n


def test_balanced_mask_never_keeps_a_zero():
    """A pruned weight stays zero, so a block keeping one holds fewer non-zeros than its peers (row B1's
    conv1: 8–17 per block, where the budget's rounding surplus fell on zero scores)."""
    first = make_masks(W, 0.05, PruneSpec(balanced=WORKLOAD))
    pruned = {n: w * first[n] for n, w in W.items()}
    assert sum(counts(first).values()) == 18880 < round(0.0499 * N) == 18983   # a surplus of 103
    again = make_masks(pruned, 0.0499, PruneSpec(balanced=WORKLOAD))
    assert counts(again) == counts(first) == {"conv1": 3456, "conv2": 6400, "conv3": 7424, "fc": 1600}
    for n, m in again.items():
        assert not (m & (pruned[n] == 0)).any(), n
    # a block with fewer live entries than the budget's share sets the count of the whole layer
    w = torch.randn(32, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    w[0:2, 0:2] = 0
    w[0, 0, 1] = 1.0                                       # block 0 keeps 3 non-zeros
    for density in (0.5, 0.2):                             # 18 and 7 per block by the budget
        m = make_masks({"conv": w}, density, PruneSpec(balanced=WORKLOAD))["conv"]
        assert blocks(m.float(), WORKLOAD).sum(1).tolist() == [3.0] * 64
        assert not (m & (w == 0)).any()
    w[0, 0] = 0
    with pytest.raises(ValueError, match="18 by the budget, 0 live in the sparsest block"):
        make_masks({"conv": w}, 0.5, PruneSpec(balanced=WORKLOAD))


def chain_weights():
    """conv1 → conv2 → conv3 → fc. conv1's filter 5 is large but feeds nothing (conv2's channel 5 is
    pruned); conv2's channel 9 is large but reads conv1's empty filter 9."""
    g = torch.Generator().manual_seed(0)
    s = {"conv1": torch.randn(32, 3, 3, 3, generator=g), "conv2": torch.randn(32, 32, 3, 3, generator=g),
         "conv3": torch.randn(32, 32, 3, 3, generator=g), "fc": torch.randn(10, 32, generator=g)}
    s["conv1"][5] *= 10
    s["conv2"][:, 5] = 0
    s["conv1"][9] = 0
    s["conv2"][:, 9] *= 10
    return s


def test_unconnected():
    cut = unconnected({n: w != 0 for n, w in chain_weights().items()})
    assert [tuple(c.shape) for c in cut.values()] == [(32, 3), (32, 32), (32, 32), (10, 32)]
    assert cut["conv1"].nonzero().tolist() == [[5, 0], [5, 1], [5, 2]]      # filter 5: no reader
    assert cut["conv2"].nonzero().tolist() == [[f, 9] for f in range(32)]    # channel 9: no producer
    assert not cut["conv3"].any() and not cut["fc"].any()


def test_balanced_chain_keeps_no_unconnected_weight():
    s = chain_weights()
    spec = PruneSpec(balanced=WORKLOAD)
    plain = make_masks(s, 0.3, spec)
    assert int(plain["conv1"][5].sum()) == 24 and int(plain["conv2"][:, 9].sum()) == 238   # by magnitude
    masks = make_masks(s, 0.3, spec, chain=True)
    assert int(masks["conv1"][5].sum()) == 0 and int(masks["conv2"][:, 9].sum()) == 0
    readers = (s["conv2"] != 0).transpose(0, 1).flatten(1).any(1)
    assert readers.sum() == 31 and not masks["conv1"][~readers].any()       # conv1 keeps live filters only
    per_block = {n: blocks(m.float(), WORKLOAD).sum(1).unique().tolist() for n, m in masks.items()}
    assert per_block == {"conv1": [9.0], "conv2": [38.0], "conv3": [39.0], "fc": [6.0]}
    assert sum(counts(masks).values()) <= round(0.3 * sum(w.numel() for w in s.values()))
    again = make_masks({n: w.clone() for n, w in s.items()}, 0.3, spec, chain=True)
    assert all(torch.equal(masks[n], again[n]) for n in s)
    # other specs ignore chain: the masks of the unbalanced rows stay as they were
    for other in (PruneSpec(), PruneSpec("kernel")):
        a, b = make_masks(s, 0.3, other, chain=True), make_masks(s, 0.3, other)
        assert all(torch.equal(a[n], b[n]) for n in s)


@pytest.mark.parametrize("spec, density", [
    (PruneSpec(), 0.0031), (PruneSpec(), 0.004), (PruneSpec("kernel"), 0.0035)])
def test_floors_at_extreme_ratio(spec, density):
    masks = make_masks(W, density, spec)
    c = counts(masks)
    assert sum(c.values()) <= round(density * N)
    if spec.granularity == "unstructured":
        assert all(c[n] >= FLOORS[n] for n in W), c
    else:  # kernel floors in kernels: conv1 ceil(921/9), convs ceil(32/9); the fc per weight
        assert c["conv1"] >= 103 * 9 and c["conv2"] >= 4 * 9 and c["conv3"] >= 7 * 9 and c["fc"] >= 128, c
    assert c["conv1"] >= int(0.1 * W["conv1"].numel())          # conv1 ~10%
    assert c["fc"] >= 0.05 * W["fc"].numel()                     # classifier 5%
    assert all(c[n] >= 32 for n in ("conv2", "conv3"))           # every conv >= 32 weights
    # without floors the same budget starves some layer below them
    free = counts(make_masks(W, density, dataclasses.replace(spec, floors=False)))
    assert sum(free.values()) <= round(density * N)
    assert any(free[n] < FLOORS[n] for n in W), free


def test_conv1_floor_is_ten_percent_unstructured():
    c = counts(make_masks(W, 0.0031, PruneSpec()))
    assert c["conv1"] >= 0.10 * W["conv1"].numel()


@pytest.mark.parametrize("granularity", ["unstructured", "kernel"])
def test_balanced_masks_keep_floors(granularity):
    c = counts(make_masks(W, 0.01, PruneSpec(granularity, balanced=WORKLOAD)))
    assert c["conv1"] >= FLOORS["conv1"] and c["fc"] >= FLOORS["fc"], c


@pytest.mark.parametrize("call, message", [
    (lambda: make_masks(W, 0.001, PruneSpec()), "floors"),
    (lambda: make_masks(W, 0.001, PruneSpec("kernel")), "floors"),
    (lambda: make_masks(W, 1e-4, PruneSpec(balanced=WORKLOAD, floors=False)), "fewer than one per block"),
    (lambda: make_masks(W, 1e-3, PruneSpec("kernel", balanced=WORKLOAD, floors=False)), "balance"),
    (lambda: make_masks(W, 0.1, PruneSpec("pattern")), "library"),
    (lambda: make_masks(W, 0.0, PruneSpec()), "density"),
    (lambda: make_masks(W, -0.1, PruneSpec()), "density"),
    (lambda: make_masks(W, 1.01, PruneSpec()), "density"),
    (lambda: make_masks(W, float("nan"), PruneSpec()), "density"),
    (lambda: PruneSpec("filter"), "granularity"),
    (lambda: PruneSpec(allocation="global"), "allocation"),
    (lambda: make_masks(W, 0.05, PruneSpec(balanced=WORKLOAD, allocation="erk")), "ERK"),
    (lambda: make_masks({"c": torch.randn(8, 4, 5, 5)}, 0.5, PruneSpec("pattern"),
                        library=pattern_library(W)), "3×3"),
])
def test_impossible_configurations_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_budget_below_floors_message_names_the_numbers():
    with pytest.raises(ValueError) as e:
        make_masks(W, 0.001, PruneSpec())
    assert "380 weights" in str(e.value) and "1141 weights" in str(e.value)


def test_density_one_keeps_everything():
    masks = make_masks(W, 1.0, PruneSpec("kernel"))
    assert all(m.all() for m in masks.values())


@pytest.mark.parametrize("spec", [PruneSpec(), PruneSpec("kernel"), PruneSpec("pattern"),
                                  PruneSpec(balanced=WORKLOAD)])
def test_deterministic(spec):
    lib = pattern_library(W) if spec.granularity == "pattern" else None
    a = make_masks(W, 0.03, spec, lib)
    b = make_masks({n: w.clone() for n, w in W.items()}, 0.03, spec, lib)
    for n in W:
        assert torch.equal(a[n], b[n]), n


def test_single_layer_magnitude_top_k():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 16, 3, 3, generator=g)
    for density in (0.5, 0.3, 0.11):
        m = make_masks({"conv": w}, density, PruneSpec())["conv"]
        k = round(density * w.numel())
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[w.abs().flatten().topk(k).indices] = True
        assert torch.equal(m.flatten(), expected)
    # below the single layer's 10% floor only floors=False goes further
    with pytest.raises(ValueError, match="floors"):
        make_masks({"conv": w}, 0.05, PruneSpec())
    m = make_masks({"conv": w}, 0.05, PruneSpec(floors=False))["conv"]
    assert int(m.sum()) == round(0.05 * w.numel())
    assert w.abs()[m].min() > w.abs()[~m].max()


def test_make_masks_does_not_touch_weights():
    weights = {n: w.clone() for n, w in W.items()}
    make_masks(weights, 0.02, PruneSpec("pattern"), pattern_library(weights))
    pattern_library(weights)
    assert all(torch.equal(weights[n], W[n]) for n in W)


# ============================================================================ pattern_library (§5.5)

def test_pattern_library_votes_most_frequent_supports():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(60, 10, 9, generator=g) * 0.1          # random background: 200 kernels spread
    # over C(8, 3) = 56 supports, a handful of votes each
    supports = {(0, 1, 2): 200, (3, 5, 7): 120, (6, 7, 8): 50, (0, 2, 6): 30}   # + centre 4
    flat = w.view(-1, 9)
    i = 0
    for others, n in supports.items():
        for _ in range(n):
            flat[i, list(others)] += 1.0 + torch.rand(3, generator=g)
            i += 1
    weights = {"a": w.view(60, 10, 3, 3)[:20], "b": w.view(60, 10, 3, 3)[20:]}  # votes pool over layers
    lib = pattern_library(weights, size=3)
    assert lib.dtype == torch.bool and lib.shape == (3, 9)
    assert (lib.sum(1) == 4).all() and lib[:, 4].all()
    expected = [sorted((*o, 4)) for o in list(supports)[:3]]
    assert [torch.nonzero(r).flatten().tolist() for r in lib] == expected
    # the default library: 8 rows; non-3×3 layers and linear layers do not vote
    lib8 = pattern_library({**weights, "fc": torch.randn(10, 90), "pw": torch.randn(8, 8, 1, 1)})
    assert lib8.shape == (8, 9) and (lib8.sum(1) == 4).all() and lib8[:, 4].all()
    assert torch.equal(lib8[:4], pattern_library(weights, size=4))
    assert len({tuple(r.tolist()) for r in lib8}) == 8


def test_pattern_library_centre_is_forced():
    w = torch.zeros(4, 4, 3, 3)
    w[:, :, 0, :] = 5.0                                   # the top row dominates, centre is 0
    w[:, :, 1, 0] = 1.0
    lib = pattern_library({"c": w}, size=8)
    assert lib.shape == (1, 9)                            # one distinct support only
    assert torch.nonzero(lib[0]).flatten().tolist() == [0, 1, 2, 4]


# ============================================================================ density ramp (§5.8)

def test_density_at():
    assert density_at(0.0, 1.0, 0.001) == pytest.approx(1.0, rel=1e-12)
    assert density_at(1.0, 1.0, 0.001) == pytest.approx(0.001, rel=1e-12)
    assert density_at(0.0, 0.02, 0.002) == pytest.approx(0.02, rel=1e-12)
    assert density_at(-1.0, 1.0, 0.01) == pytest.approx(1.0) and density_at(2.0, 1.0, 0.01) == pytest.approx(0.01)
    for d0, df in ((1.0, 0.001), (1.0, 0.1), (0.02, 0.002)):
        assert density_at(0.5, d0, df) == pytest.approx(
            math.exp(math.log(df) + (math.log(d0) - math.log(df)) * 0.125), rel=1e-12)
        ds = [density_at(t / 100, d0, df) for t in range(101)]
        assert all(a > b for a, b in zip(ds, ds[1:]))
    # log-cubic, not cubic in density: half way through 1 -> 1/1000 the density is 10^-2.625
    assert density_at(0.5, 1.0, 0.001) == pytest.approx(10 ** -2.625, rel=1e-9)
    assert density_at(0.8, 1.0, 0.001) == pytest.approx(10 ** (-3 + 3 * 0.2 ** 3), rel=1e-9)


# ============================================================================= MaskCallback in fit

def tiny_split(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g), "tiny-mnist")


SPLIT = tiny_split()


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", hidden=(64, 32))


MLP_N = 784 * 64 + 64 * 32 + 32 * 10      # 52,544 weights


class Capture(Callback):
    """Snapshots of weights, masks and momentum buffers at the end of every epoch."""

    def __init__(self, masks_cb):
        self.masks_cb, self.epochs = masks_cb, []

    def after_epoch(self, state):
        weights = prunable_weights(state.model)
        snap = {}
        for n, w in weights.items():
            buf = state.optimizer.state[w]["momentum_buffer"]
            snap[n] = (w.detach().clone(), self.masks_cb.masks[n].clone(), buf.clone())
        self.epochs.append(snap)


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def before_epoch(self, state):
        if state.epoch == self.epoch:
            raise KeyboardInterrupt


CFG = TrainConfig(epochs=3, lr=0.05, checkpoint_every=1, eval_every=0)


def run_fit(masks_cb, *extra, path=None, seed=0, cfg=CFG):
    loader = GpuLoader(SPLIT, 64, train=True, seed=1)
    return fit(small_mlp(seed), loader, None, cfg, callbacks=[masks_cb, *extra], device="cpu",
               checkpoint_path=path, progress=False)


@pytest.fixture(scope="module")
def pruned_run():
    mcb = MaskCallback(PruneSpec(), 0.1, ramp_epochs=2)
    cap = Capture(mcb)
    model, history = run_fit(mcb, cap)
    return mcb, cap, model, history


def test_fit_prunes_to_target_density(pruned_run):
    mcb, cap, model, history = pruned_run
    total, nonzero = count_weights(model)
    assert total == MLP_N
    assert nonzero == round(0.1 * MLP_N)                          # exact for unstructured
    assert abs(nonzero / total - 0.1) < 0.001
    assert mcb.d0 == 1.0
    d1 = round(density_at(0.5, 1.0, 0.1) * MLP_N) / MLP_N       # epoch 0 of the 2-epoch ramp
    dt = round(0.1 * MLP_N) / MLP_N
    assert history["density"].tolist() == pytest.approx([d1, dt, dt], abs=1e-12)
    assert history["density"].is_monotonic_decreasing
    assert history["density"].iloc[-1] == pytest.approx(0.1, abs=1e-4)
    # floors of the MLP: fc1 (first layer) 10%, fc2 and fc3 5% as linear layers
    w = prunable_weights(model)
    assert int((w["fc1.weight"] != 0).sum()) >= 5017
    assert int((w["fc2.weight"] != 0).sum()) >= 102
    assert int((w["fc3.weight"] != 0).sum()) >= 16


def test_fit_masked_weights_and_momentum_are_zero(pruned_run):
    mcb, cap, model, history = pruned_run
    assert len(cap.epochs) == 3
    for snap in cap.epochs:
        for n, (w, m, buf) in snap.items():
            assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
            pruned = m == 0
            assert pruned.any(), n
            assert (w[pruned] == 0).all(), n
            assert (buf[pruned] == 0).all(), n             # momentum cannot resurrect them
            assert (buf[~pruned] != 0).float().mean() > 0.5, n   # the buffers are live elsewhere
            assert (w[~pruned] != 0).all(), n
    final = prunable_weights(model)
    for n, m in mcb.masks.items():
        assert torch.equal(final[n].detach() != 0, m.bool()), n


def test_fit_masks_are_monotone(pruned_run):
    mcb, cap, model, history = pruned_run
    final = prunable_weights(model)
    for n in final:
        m0, m1, m2 = (snap[n][1].bool() for snap in cap.epochs)
        assert (m1 <= m0).all() and (m2 <= m1).all(), n
        assert torch.equal(m2, m1), n                       # no change after the ramp
        assert (final[n].detach()[~m0] == 0).all(), n       # pruned at epoch 1: still zero at the end
    assert sum(int((~s[1].bool()).sum()) for s in cap.epochs[0].values()) < \
        sum(int((~s[1].bool()).sum()) for s in cap.epochs[1].values())


def test_target_above_start_density_raises():
    model = small_mlp()
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w[w.abs() < w.abs().median()] = 0.0                # density ~0.5
    loader = GpuLoader(SPLIT, 64, train=True)
    with pytest.raises(ValueError, match="above the model's own"):
        fit(model, loader, None, CFG, callbacks=[MaskCallback(PruneSpec(), 0.6, 2)], device="cpu",
            progress=False)
    with pytest.raises(ValueError, match="pruning cannot add weights"):
        fit(small_mlp(), loader, None, CFG, callbacks=[MaskCallback(PruneSpec(), 1.5, 2)], device="cpu",
            progress=False)


def test_start_density_of_a_sparse_model():
    model = small_mlp()
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w[w.abs() < w.abs().quantile(0.8)] = 0.0           # density ~0.2
    zero_before = {n: w.detach() == 0 for n, w in prunable_weights(model).items()}
    mcb = MaskCallback(PruneSpec(), 0.12, ramp_epochs=1)
    loader = GpuLoader(SPLIT, 64, train=True)
    model, hist = fit(model, loader, None, TrainConfig(epochs=1, lr=0.05, eval_every=0), callbacks=[mcb],
                      device="cpu", progress=False)
    start = sum(int((~z).sum()) for z in zero_before.values()) / MLP_N
    assert mcb.d0 == pytest.approx(start, abs=1e-12) and 0.19 < start < 0.21
    assert hist["density"].tolist() == [round(0.12 * MLP_N) / MLP_N]
    for n, w in prunable_weights(model).items():
        assert (w.detach()[zero_before[n]] == 0).all(), n       # already-zero weights stay pruned


def test_fit_balanced_nonzeros_in_every_block():
    """Row B1's defect on a small VGG: conv1's filter 5 is zero and feeds nothing, so it gets no
    gradient; the old masks re-admitted its positions to fill their blocks (13 each) and they stayed
    zero: 9–13 non-zeros per block. Filter 9 feeds nothing either but is non-zero: a balanced mask
    must not spend slots on it."""
    torch.manual_seed(0)
    model = create_model("vgg16", widths=[32] * 13)
    with torch.no_grad():
        w = prunable_weights(model)
        w["features.0.weight"][5] = 0
        w["features.3.weight"][:, [5, 9]] = 0
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (128,), generator=g), "tiny-cifar")
    mcb = MaskCallback(PruneSpec(balanced=WORKLOAD), 0.3, ramp_epochs=1)
    model, _ = fit(model, GpuLoader(split, 32, train=True, seed=1), None,
                   TrainConfig(epochs=2, lr=0.05, eval_every=0), callbacks=[mcb], device="cpu", progress=False)
    weights = prunable_weights(model)
    for n, p in weights.items():
        nonzero = blocks((p.detach() != 0).float(), WORKLOAD).sum(1)
        assert torch.equal(nonzero, blocks(mcb.masks[n], WORKLOAD).sum(1)), n    # every kept weight is non-zero
        assert nonzero.min() == nonzero.max() > 0, (n, nonzero.unique())
    conv1 = weights["features.0.weight"].detach() != 0
    assert blocks(conv1.float(), WORKLOAD).sum(1).tolist() == [9.0] * 48         # filters 4 and 8 alone in their groups
    assert not conv1[[5, 9]].any() and not mcb.masks["features.0.weight"][[5, 9]].any()
    assert _plain_stack(model) and _plain_stack(small_mlp()) and not _plain_stack(create_model("resnet56"))


def test_callback_state_dict_round_trip(pruned_run):
    mcb = pruned_run[0]
    d = mcb.state_dict()
    assert d["d0"] == 1.0 and "library" not in d
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in d["masks"].values())
    fresh = MaskCallback(PruneSpec(), 0.1, ramp_epochs=2)
    fresh.load_state_dict(d)
    assert fresh.d0 == 1.0 and fresh.library is None
    assert list(fresh.masks) == list(mcb.masks)
    for n, m in fresh.masks.items():
        assert m.dtype == torch.float32 and torch.equal(m, mcb.masks[n]), n
    assert fresh.density() == mcb.density()
    # a pattern callback carries its library
    pat = MaskCallback(PruneSpec("pattern"), 0.1, 1)
    pat.masks, pat.d0, pat.library = {"c": torch.ones(2, 2, 3, 3)}, 0.37, pattern_library(W)
    d = pat.state_dict()
    assert d["d0"] == 0.37 and d["library"].dtype == torch.bool
    back = MaskCallback(PruneSpec("pattern"), 0.1, 1)
    back.load_state_dict(d)
    assert back.d0 == 0.37
    assert torch.equal(back.library, pattern_library(W)) and back.masks["c"].dtype == torch.float32


@pytest.mark.parametrize("stop", [1, 2])   # mid-ramp, and after the ramp (masks only from the file)
def test_resume_keeps_masks(pruned_run, tmp_path, stop):
    _, cap_straight, straight, hist_straight = pruned_run
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run_fit(MaskCallback(PruneSpec(), 0.1, ramp_epochs=2), StopAt(stop), path=path)
    assert path.is_file()
    mcb = MaskCallback(PruneSpec(), 0.1, ramp_epochs=2)
    cap = Capture(mcb)
    model, hist = run_fit(mcb, cap, path=path, seed=5)       # a different init: the file must win
    assert len(cap.epochs) == 3 - stop
    assert mcb.d0 == 1.0
    total, nonzero = count_weights(model)
    assert nonzero == round(0.1 * total)
    assert hist["density"].tolist() == hist_straight["density"].tolist()
    final = prunable_weights(model)
    ref = prunable_weights(straight)
    pruned_at_cut = {n: cap_straight.epochs[stop - 1][n][1] == 0 for n in final}
    for n, w in final.items():
        assert (w.detach()[pruned_at_cut[n]] == 0).all(), n   # pruned before the cut: still zero
        assert torch.equal(w.detach() != 0, ref[n].detach() != 0), n
        torch.testing.assert_close(w.detach(), ref[n].detach(), rtol=1e-5, atol=1e-6)
    for n, (w, m, buf) in cap.epochs[-1].items():
        assert (buf[m == 0] == 0).all(), n


def test_masks_take_their_tensors_layout_so_enforcement_stays_one_fused_kernel():
    """``_foreach_mul_`` is fused only over pairs that share strides. The trainer's weights are
    channels_last, ``make_masks`` returns contiguous masks, and a momentum buffer (a clone of the first
    gradient) has whatever layout the backward chose: each mask must follow its own tensor."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10)).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mcb = MaskCallback(PruneSpec(), 0.1, ramp_epochs=4, rewire=0.3)   # keeps a gradient average
    state = SimpleNamespace(model=model, optimizer=opt, epoch=0, metrics={}, train_loader=None)
    mcb.on_train_begin(state)
    mcb.before_epoch(state)                                   # a ramp update: new masks from make_masks
    weights = prunable_weights(model)
    assert weights["0.weight"].stride() == (27, 1, 9, 3)      # channels_last, not (27, 9, 3, 1)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
        opt.step()
        if _ == 0:  # as if the backward had produced contiguous gradients
            for w in weights.values():
                opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"].contiguous()
        mcb.after_step(state)
    bufs = {n: opt.state[w]["momentum_buffer"] for n, w in weights.items()}
    assert bufs["0.weight"].stride() == (27, 9, 3, 1)
    _, _, bound_bufs, buf_masks = mcb._bound(model, opt)
    assert [b is bufs[n] for n, b in zip(weights, bound_bufs)] == [True] * 3
    for n, w in weights.items():
        m = mcb.masks[n]
        assert m.stride() == w.stride() and mcb.grad[n].stride() == w.grad.stride(), n
        assert buf_masks[list(weights).index(n)].stride() == bufs[n].stride(), n
        assert (w[m == 0] == 0).all() and (bufs[n][m == 0] == 0).all(), n
    assert sum(int(m.sum()) for m in mcb.masks.values()) == round(
        sum(w.numel() for w in weights.values()) * density_at(0.25, 1.0, 0.1))


# ======================================================================= rewiring (spec §5.8b)

def test_rewire_fraction_follows_a_cosine_to_zero():
    mcb = MaskCallback(PruneSpec(), 0.1, ramp_epochs=4, rewire=0.3)
    expected = [0.3 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3, 4)]
    assert [mcb.rewire_fraction(e) for e in range(6)] == pytest.approx(expected + [0.0, 0.0], abs=1e-12)
    assert expected[0] == pytest.approx(0.2561, abs=1e-4) and expected[-1] == pytest.approx(0.0, abs=1e-12)
    assert [MaskCallback(PruneSpec(), 0.1, 4).rewire_fraction(e) for e in range(5)] == [0.0] * 5


@pytest.mark.parametrize("spec, rewire, message", [
    (PruneSpec("pattern"), 0.3, "needs unstructured or kernel masks"),
    (PruneSpec("kernel", balanced=WORKLOAD), 0.3, "needs unstructured or kernel masks"),
    (PruneSpec(balanced=WORKLOAD), 0.3, "needs unstructured or kernel masks"),
    (PruneSpec(), 1.0, r"in \[0, 1\)"),
    (PruneSpec(), -0.1, r"in \[0, 1\)"),
])
def test_rewire_refuses_what_it_cannot_do(spec, rewire, message):
    with pytest.raises(ValueError, match=message):
        MaskCallback(spec, 0.1, 4, rewire=rewire)


def test_rewired_swaps_smallest_kept_for_largest_gradient():
    w = torch.tensor([[5.0, 0.0, 4.0, 0.0, 1.0],
                      [0.0, 3.0, 0.0, 2.0, 0.5]]).requires_grad_()
    keep = w.detach() != 0                                    # 6 kept
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.full_like(w, 7.0)
    mcb = MaskCallback(PruneSpec(), 0.1, 4, rewire=0.3)
    mcb.grad = {"w": torch.tensor([[9.0, 0.1, 9.0, 8.0, 9.0],
                                   [6.0, 9.0, 0.2, 9.0, 9.0]])}
    out = mcb._rewired({"w": keep}, {"w": w}, 0.5, opt)["w"]  # swap int(0.5 * 6) = 3
    assert int(out.sum()) == 6
    # out: the 3 smallest kept (0.5, 1, 2); in: the 3 pruned with the largest gradient (8, 6, 0.2)
    assert out.tolist() == [[True, False, True, True, False], [True, True, True, False, False]]
    grown = out & ~keep
    assert (w.detach()[grown] == 0).all() and (opt.state[w]["momentum_buffer"][grown] == 0).all()
    assert (opt.state[w]["momentum_buffer"][~grown] == 7.0).all()
    assert w.detach()[0, 0] == 5.0 and w.detach()[1, 4] == 0.5     # the mask change alone drops a weight


def test_rewired_kernels_swap_whole_kernels_and_linear_layers_single_weights():
    """Kernel masks (robust row R2 with REWIRE) swap k×k kernels, ranked as make_masks ranks them (mean
    square, not the largest entry) and regrown by their mean |gradient|; a linear layer swaps weights."""
    w = torch.zeros(2, 4, 2, 2)
    for (f, c), v in {(0, 0): 5.0, (0, 2): 1.0, (1, 1): 1.6, (1, 2): 0.5}.items():
        w[f, c] = v
    w[0, 2, 0, 0] = 2.5                          # kernel (0, 2): largest entry 2.5, mean square 2.31 < 2.56
    w.requires_grad_()
    fc = torch.tensor([[4.0, 0.0, 1.0, 0.0]]).requires_grad_()
    keep = {"conv": w.detach() != 0, "fc": fc.detach() != 0}       # 4 of 8 kernels, 2 of 4 weights
    opt = torch.optim.SGD([w, fc], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.full_like(w, 7.0)
    mcb = MaskCallback(PruneSpec("kernel"), 0.1, 4, rewire=0.3)
    g = torch.zeros(2, 4, 2, 2)
    g[0, 1], g[1, 0], g[0, 3] = 2.0, 2.5, 1.0
    g[0, 1, 0, 0] = -6.0                         # mean |g|: (0, 1) 3.0, (1, 0) 2.5, (1, 3) 1.475, (0, 3) 1.0
    g[1, 3, 0, 0] = 5.9                          # (1, 3)'s largest entry is not what counts
    mcb.grad = {"conv": g, "fc": torch.tensor([[0.0, 9.0, 0.0, 8.0]])}
    out = mcb._rewired(keep, {"conv": w, "fc": fc}, 0.5, opt)      # int(0.5 * 4) = 2 kernels, 1 weight
    kernels = out["conv"].flatten(2)
    assert (kernels.all(2) == kernels.any(2)).all()                # whole kernels only
    # out: (1, 2) (mean square 0.25) and (0, 2) (2.31); in: (0, 1) and (1, 0)
    assert kernels.any(2).tolist() == [[True, True, False, False], [True, True, False, False]]
    assert out["fc"].tolist() == [[True, True, False, False]]       # 1 out, the largest gradient in
    grown = out["conv"] & ~keep["conv"]
    assert int(grown.sum()) == 8 and (w.detach()[grown] == 0).all()
    assert (opt.state[w]["momentum_buffer"][grown] == 0).all() and (opt.state[w]["momentum_buffer"][~grown] == 7.0).all()


def test_fit_with_kernel_rewiring_keeps_whole_kernels_and_revives_some():
    torch.manual_seed(0)
    model = create_model("vgg16", widths=[16] * 13)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (128,), generator=g), "tiny-cifar")
    mcb = MaskCallback(PruneSpec("kernel"), 0.2, ramp_epochs=3, rewire=0.3)
    cap = Capture(mcb)
    model, history = fit(model, GpuLoader(split, 32, train=True, seed=1), None,
                         TrainConfig(epochs=4, lr=0.05, eval_every=0), callbacks=[mcb, cap], device="cpu",
                         progress=False)
    revived = 0
    for before, after in zip(cap.epochs, cap.epochs[1:]):
        for n, (w, m, buf) in after.items():
            if m.dim() == 4:
                k = m.flatten(2)
                assert (k.all(2) == k.any(2)).all(), n
                revived += int((~before[n][1].flatten(2).any(2) & k.any(2)).sum())
            assert (w[m == 0] == 0).all() and (buf[m == 0] == 0).all(), n
    assert revived > 0
    counts = [sum(int(m.sum()) for _, m, _ in snap.values()) for snap in cap.epochs]
    assert counts[-1] == counts[-2] and mcb.grad is None              # frozen and freed after the ramp
    total = sum(m.numel() for _, m, _ in cap.epochs[-1].values())
    assert counts[-1] <= round(0.2 * total) and history["density"].iloc[-1] == pytest.approx(0.2, abs=0.01)


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["clean", "adversarial"])
def rewired_run(request):
    """Rewiring on plain training, and on DNR's hybrid loss (robust row R1 with REWIRE, notebook 16), whose
    regrowth ranks by the gradient of the clean and the PGD term together."""
    mcb = MaskCallback(PruneSpec(), 0.1, ramp_epochs=3, rewire=0.3)
    cap = Capture(mcb)
    cfg = dataclasses.replace(CFG, epochs=4, adversarial_beta=request.param, adv_steps=2)
    model, history = run_fit(mcb, cap, cfg=cfg)
    return mcb, cap, model, history, cfg


def test_fit_with_rewiring_keeps_exact_counts_and_revives_weights(rewired_run):
    mcb, cap, model, history, _ = rewired_run
    total, nonzero = count_weights(model)
    assert nonzero == round(0.1 * MLP_N)
    assert history["density"].tolist() == [round(density_at(e / 3, 1.0, 0.1) * MLP_N) / MLP_N
                                           for e in (1, 2, 3, 3)]
    revived = 0
    for before, after in zip(cap.epochs, cap.epochs[1:]):
        for n in before:
            revived += int(((before[n][1] == 0) & (after[n][1] == 1)).sum())
            w, m, buf = after[n]
            assert (w[m == 0] == 0).all() and (buf[m == 0] == 0).all(), n
    assert revived > 0                                        # no longer monotone: weights came back
    assert mcb.grad is None                                   # freed once no update rewires any more
    final = prunable_weights(model)
    for n, m in mcb.masks.items():
        assert torch.equal(final[n].detach() != 0, m.bool()), n
        assert torch.equal(cap.epochs[-1][n][1], cap.epochs[-2][n][1]), n   # frozen after the ramp


def test_resume_mid_ramp_rewires_as_the_uninterrupted_run(rewired_run, tmp_path):
    _, cap_straight, straight, _, cfg = rewired_run
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run_fit(MaskCallback(PruneSpec(), 0.1, ramp_epochs=3, rewire=0.3), StopAt(1), path=path, cfg=cfg)
    mcb = MaskCallback(PruneSpec(), 0.1, ramp_epochs=3, rewire=0.3)
    cap = Capture(mcb)
    model, _ = run_fit(mcb, cap, path=path, seed=5, cfg=cfg)
    for snap, ref in zip(cap.epochs, cap_straight.epochs[1:]):
        for n in snap:
            assert torch.equal(snap[n][1], ref[n][1]), n
    for n, w in prunable_weights(model).items():
        torch.testing.assert_close(w.detach(), prunable_weights(straight)[n].detach(), rtol=1e-5, atol=1e-6)


# ================================================================================ run_row smoke

def test_a_recipe_takes_a_dense_key_or_a_row_id_as_teacher():
    from elastictrain.prune.recipe import PruneRecipe

    distil = TrainConfig(distill_alpha=0.9)
    for teacher in ("vgg16", "E1"):
        assert PruneRecipe(row="E2b", spec=PruneSpec(), ratio=1000, ramp_epochs=1, train=distil,
                           teacher=teacher).teacher == teacher
    with pytest.raises(ValueError, match="dense model.*or a shipped row id"):
        PruneRecipe(row="E2b", spec=PruneSpec(), ratio=1000, ramp_epochs=1, train=distil, teacher="E99")


def _listing(folder: Path):
    if not folder.is_dir():
        return None
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_run_row_smoke_writes_outside_the_repo(monkeypatch, tmp_path):
    import tempfile

    from elastictrain import data as D
    from elastictrain import load_compressed
    from elastictrain.metrics import paper_compression
    from elastictrain.prune.recipe import PruneRecipe, run_row

    if not (D.data_root() / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found under {D.data_root()} (set ELASTICTRAIN_DATA)")
    monkeypatch.chdir(REPO)                       # trained_models_dir() looks at ./TrainedModels
    monkeypatch.delenv("ELASTICTRAIN_CHECKPOINTS")  # and checkpoints/ is the repository's
    # smoke runs write into mkdtemp() folders (the dense smoke checkpoint is never removed): keep
    # them under pytest's tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _listing(REPO / "TrainedModels"), _listing(REPO / "checkpoints")
    # Distilled from a shipped row ("teacher assistant"), which smoke mode loads from the committed file.
    recipe = PruneRecipe(row="E1", spec=PruneSpec(), ratio=50, ramp_epochs=40, rewire=0.3, teacher="E4",
                         train=TrainConfig(epochs=150, lr=0.05, schedule="cosine", warmup=0.0, hold=0.3,
                                           distill_alpha=0.9))
    result = run_row(recipe, smoke=True, device="cpu", progress=False)
    try:
        path = Path(result.path).resolve()
        assert path.is_file() and path.name == "E1.etm"
        assert REPO.resolve() not in path.parents
        assert (REPO / "TrainedModels").resolve() not in path.parents
        model = load_compressed(path)
        assert paper_compression(model) >= 49.9
        assert paper_compression(model) == pytest.approx(result.ratio, rel=1e-12)
        assert model.meta["row"] == "E1" and model.meta["smoke"] is True
        assert model.meta["rewire"] == 0.3                           # the file says how it was pruned
        teacher = load_compressed(REPO / "TrainedModels" / "E4.etm")
        assert (model.meta["teacher"], model.meta["teacher_accuracy"]) == ("E4", teacher.meta["accuracy"])
        assert model.meta["epochs"] == 2 == len(result.history)       # smoke: 2 epochs, 1 of ramp
        assert result.history["density"].tolist() == pytest.approx([1 / 50, 1 / 50], abs=1e-6)
        assert not (path.parent / ".E1.run").exists()                 # the run state is cleaned up
        assert (_listing(REPO / "TrainedModels"), _listing(REPO / "checkpoints")) == before
    finally:
        if Path(result.path).parent.parent == tmp_path:
            shutil.rmtree(Path(result.path).parent, ignore_errors=True)


def test_pattern_library_needs_3x3_convs():
    with pytest.raises(ValueError, match="3×3"):
        pattern_library({"fc": torch.randn(10, 20)})


@pytest.mark.parametrize("groups", [0, -1])
def test_structure_refuses_non_positive_groups(groups):
    with pytest.raises(ValueError, match="positive"):
        Structure(groups, ANY, ANY, ANY)


def test_kernel_supports_and_block_nonzeros_count_a_pattern_model():
    from elastictrain.metrics import block_nonzeros, kernel_supports
    torch.manual_seed(0)
    model = create_model("vgg16", widths=[16, 16, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32])
    weights = prunable_weights(model)
    lib = pattern_library(weights)
    masks = make_masks(weights, 0.05, PruneSpec("pattern", balanced=WORKLOAD), library=lib)
    with torch.no_grad():
        for n, w in weights.items():
            w.mul_(masks[n])
    sup = kernel_supports(model)
    assert len(sup) == 13 and len(sup.columns) <= 8
    codes = {int((lib[i].long() << torch.arange(9)).sum()) for i in range(len(lib))}
    assert set(int(c) for c in sup.columns) <= codes                 # only library patterns survive
    assert all(bin(int(c)).count("1") == 4 for c in sup.columns)
    assert int(sup.to_numpy().sum()) == sum(int(masks[n].flatten(2).any(2).sum()) for n in masks if masks[n].dim() == 4)
    per_block = block_nonzeros(model, WORKLOAD)
    assert len(per_block["features.0.weight"]) == 48 and len(per_block["classifier.weight"]) == 40
    for n, c in per_block.items():
        assert int(c.sum()) == int(masks[n].sum()), n
        assert int(c.min()) == int(c.max()), n                       # balanced: one count per layer


# ======================================================================= BN recalibration (spec §5.8)

class BnAtEpochStart(Callback):
    """conv1's BN running mean right after the callbacks before it have run ``before_epoch``."""

    def __init__(self):
        self.means, self.tracked, self.weights = [], [], None

    def before_epoch(self, state):
        bn = state.model.features[1]
        self.means.append(bn.running_mean.clone())
        self.tracked.append(int(bn.num_batches_tracked))
        self.weights = state.model.features[0].weight.detach().clone()


def test_ramp_updates_recalibrate_bn_on_the_masked_weights():
    from elastictrain.accuracy import recalibrate_bn
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (64,), generator=g), "random")
    loader = GpuLoader(split, 16, train=False)            # deterministic batches: the test can repeat them
    cfg = TrainConfig(epochs=3, lr=0.01, eval_every=0)
    runs = {}
    for batches in (0, 2):
        torch.manual_seed(0)
        model = create_model("vgg16", widths=[8] * 13)
        mcb, probe = MaskCallback(PruneSpec(), 0.2, ramp_epochs=2, recalibrate_batches=batches), BnAtEpochStart()
        fit(model, loader, None, cfg, callbacks=[mcb, probe], device="cpu", progress=False)
        runs[batches] = probe
    # epoch 0: the first mask update; recalibration replaces the fresh model's zero means ...
    assert torch.equal(runs[0].means[0], torch.zeros(8)) and not torch.equal(runs[2].means[0], torch.zeros(8))
    torch.manual_seed(0)
    fresh = create_model("vgg16", widths=[8] * 13)
    masks = make_masks(prunable_weights(fresh), density_at(0.5, 1.0, 0.2), PruneSpec(), chain=True)
    with torch.no_grad():
        for n, w in prunable_weights(fresh).items():
            w.mul_(masks[n])
    recalibrate_bn(fresh, loader, 2)                        # ... by those of the masked weights, exactly
    torch.testing.assert_close(runs[2].means[0], fresh.features[1].running_mean, rtol=1e-6, atol=1e-7)
    # batches counted since the last reset: 2 after each ramp update (epochs 0, 1), then the 4 steps of
    # epoch 1 on top at epoch 2, which is past the ramp and not recalibrated
    assert runs[2].tracked == [2, 2, 6] and runs[0].tracked == [0, 4, 8]
    assert torch.equal(runs[2].weights, runs[0].weights)   # training normalises by batch statistics


def test_recalibrate_batches_must_not_be_negative():
    with pytest.raises(ValueError, match="recalibrate_batches"):
        MaskCallback(PruneSpec(), 0.1, 2, recalibrate_batches=-1)


# ============================================================================ start from scratch

def test_recipe_can_start_from_a_fresh_model():
    from elastictrain.prune.recipe import PruneRecipe, _start_model
    recipe = PruneRecipe(row="R1", spec=PruneSpec(), ratio=20, ramp_epochs=2, base="init:vgg16",
                         train=TrainConfig(epochs=4, seed=3))
    model, record = _start_model(recipe, smoke=True, device="cpu")
    assert record == {"base": "init:vgg16"}
    torch.manual_seed(3)
    ref = create_model("vgg16")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n                              # the seeded initialisation, dense
    assert count_weights(model) == (14_715_584, 14_715_584)


def test_recipe_refuses_an_unknown_fresh_model():
    from elastictrain.prune.recipe import PruneRecipe
    with pytest.raises(ValueError, match="model name"):
        PruneRecipe(row="R1", spec=PruneSpec(), ratio=20, ramp_epochs=2, base="init:vgg19",
                    train=TrainConfig(epochs=4))
