"""Weight sharing: exact k-means, codebooks per group, trained centroids, packed storage."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights
from elastictrain.prune.structure import LAYER, WORKLOAD, block_ids, blocks
from elastictrain.quant import QuantSpec, bake_, codebooks, group_table, kmeans_1d, quantize_, unique_per_group
from elastictrain.quant.compact import fold_bn_, snap_fp16_
from elastictrain.storage import byte_report, load_compressed, save_compressed, tensor_bytes

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


def parametrized_weight_grad(m, conv, x):
    """Backpropagate a loss through ``m``; returns ``conv``'s computed weight with its gradient kept."""
    with parametrize.cached():            # the forward reuses this very tensor, so its grad is kept
        w = conv.weight
        w.retain_grad()
        m.train()(x).square().sum().backward()
    return w


def test_centroid_gradient_is_the_sum_of_member_gradients():
    m = sparse_vgg(density=0.2)
    quantize_(m, QuantSpec(3, LAYER))
    conv = m.features[3]
    w = parametrized_weight_grad(m, conv, torch.rand(4, 3, 32, 32))
    param = conv.parametrizations.weight.original
    codes = conv.parametrizations.weight[0].codes
    pos = conv.parametrizations.weight[0].positions
    expected = torch.zeros(param.numel()).index_add_(0, codes, w.grad.flatten()[pos])
    assert torch.allclose(param.grad.flatten(), expected, rtol=1e-5, atol=1e-7)


def tiny_cifar_loader(n=256, batch=64, seed=0):
    """Random CIFAR-shaped images and labels: enough for a few training steps of ``sparse_vgg``."""
    from elastictrain.data import GpuLoader, Split
    g = torch.Generator().manual_seed(seed)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g), "tiny")
    return GpuLoader(split, batch, train=True)


def test_training_moves_centroids_not_the_mask():
    from elastictrain.train import TrainConfig, fit
    m = sparse_vgg()
    mask = {n: (w != 0).clone() for n, w in prunable_weights(m).items()}
    start = {n: b.clone() for n, b in quantize_(m, QuantSpec(2, LAYER)).items()}
    fit(m, tiny_cifar_loader(), None, TrainConfig(epochs=1, lr=0.05), progress=False)
    moved = codebooks(m)
    assert any(not torch.equal(moved[n], start[n]) for n in start)
    bake_(m)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, mask[n]) and int(unique_per_group(w, LAYER).max()) <= 4


def _expected_codebook_bytes(w, spec, fp16):
    """(values, codebooks) bytes of one quantized weight in the compact codebook layout."""
    ids = block_ids(tuple(w.shape), spec.structure).flatten()
    flat = w.detach().flatten()
    counts = [int(torch.unique(flat[(ids == g) & (flat != 0)]).numel()) for g in range(int(ids.max()) + 1)]
    code_bits = sum(int(((ids == g) & (flat != 0)).sum()) * math.ceil(math.log2(c))
                    for g, c in enumerate(counts) if c > 1)
    non_empty = sum(c > 0 for c in counts)
    return math.ceil(code_bits / 8), math.ceil(non_empty * spec.bits / 8) + sum(counts) * (2 if fp16 else 4)


@pytest.mark.parametrize("spec,fp16", [(QuantSpec(4, LAYER), False), (QuantSpec(2, WORKLOAD), True)])
def test_packed_storage_round_trip_and_byte_accounting(spec, fp16, tmp_path):
    m = sparse_vgg()
    quantize_(m, spec)
    bake_(m)
    if fp16:
        snap_fp16_(m)
    path = tmp_path / "q.etm"
    size = save_compressed(m, path, {"bits": spec.bits}, quant=spec)
    back = load_compressed(path)
    a, b = m.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if not k.endswith("num_batches_tracked"))
    report = byte_report(path)
    assert size == report["total"] == path.stat().st_size
    rows = {r["tensor"]: r for r in tensor_bytes(path)}
    assert report["header"] + sum(r["bytes"] for r in rows.values()) == size
    weights = prunable_weights(m)
    for n, w in weights.items():
        values, books = _expected_codebook_bytes(w, spec, fp16)
        assert (rows[n]["enc"], rows[n]["dtype"]) == ("codebook", "f2" if fp16 else "f4")
        assert (rows[n]["values"], rows[n]["codebooks"]) == (values, books), n
    # never more than the fixed layout: bits per non-zero, 2^bits fp32 values per group
    assert report["values"] <= sum(math.ceil(int((w != 0).sum()) * spec.bits / 8) for w in weights.values())
    assert report["codebooks"] <= sum(4 * spec.structure.num_blocks(tuple(w.shape)) * spec.levels + 8
                                      for w in weights.values())


def test_groups_with_few_values_cost_fewer_bits(tmp_path):
    """A 2-bit layer whose groups hold 1 or 2 distinct values stores 0 or 1 bit per non-zero."""
    m = create_model("vgg16", widths=WIDTHS)
    with torch.no_grad():
        for w in prunable_weights(m).values():
            w.zero_()
        w = m.features[3].weight                        # 16 x 16 x 3 x 3: 16 x 4 blocks of 1 x 4 x 3 x 3
        w[0, 0, 0, 0] = w[0, 1, 1, 1] = 0.5             # block 0: one value, two weights -> 0 code bits
        w[1, 4, 0, 0], w[1, 5, 0, 0], w[1, 6, 2, 2] = 0.25, -0.25, 0.25   # block 5: two values -> 1 bit each
    path = tmp_path / "few.etm"
    save_compressed(m, path, quant=QuantSpec(2, WORKLOAD))
    row = {r["tensor"]: r for r in tensor_bytes(path)}["features.3.weight"]
    assert row["values"] == 1                           # 3 code bits, one byte
    assert row["codebooks"] == 1 + 3 * 2                # 2 counts x 2 bits; 3 fp16 values
    assert torch.equal(load_compressed(path).features[3].weight, w)


def test_mean_gradient_divides_by_members():
    m = sparse_vgg(density=0.2)
    quantize_(m, QuantSpec(3, LAYER), grad="mean")
    conv = m.features[3]
    w = parametrized_weight_grad(m, conv, torch.rand(4, 3, 32, 32))
    shared = conv.parametrizations.weight[0]
    total = torch.zeros(8).index_add_(0, shared.codes, w.grad.flatten()[shared.positions])
    members = torch.bincount(shared.codes, minlength=8)
    assert int(members.sum()) == int((w != 0).sum()) and int(members.min()) >= 1
    expected = total / members
    assert torch.allclose(conv.parametrizations.weight.original.grad.flatten(), expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="sum' or 'mean"):
        quantize_(sparse_vgg(), QuantSpec(2), grad="avg")


# ------------------------------------------------------------------ cheap BN / fp16 (quant.compact)

def _dead_and_unread(m):
    """Kill filters 0-2 of conv1 and leave channels 5, 6 of conv2's output unread by conv3."""
    with torch.no_grad():
        m.features[0].weight[:3] = 0
        m.features[7].weight[:, 5:7] = 0
        for bn in (m.features[1], m.features[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        m.features[1].bias[0] = -0.3                     # dead filter, shift < 0: ReLU makes it 0
        m.features[1].bias[1] = 0.3                      # dead filter, shift > 0: a constant channel
        m.features[0].bias.uniform_(-0.1, 0.1)
    return m


def test_fold_bn_keeps_the_function_and_zeroes_what_cannot_matter():
    m = _dead_and_unread(sparse_vgg(density=0.5)).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(x)
        shift1 = m.features[1].bias - m.features[1].weight * (m.features[1].running_mean - m.features[0].bias) \
            / torch.sqrt(m.features[1].running_var + 1e-5)
    counts = fold_bn_(m)
    with torch.no_grad():
        after = m(x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)
    assert counts == {"channels": sum(WIDTHS), "dead": 3, "unread": 2, "stored": sum(WIDTHS) - 2 - 2}
    bn1, bn2 = m.features[1], m.features[4]
    assert bn1.weight[:3].eq(0).all() and bn1.bias[0] == 0
    assert float(bn1.bias[1].detach()) == pytest.approx(float(shift1[1].detach()), rel=1e-5)
    assert bn2.weight[5:7].eq(0).all() and bn2.bias[5:7].eq(0).all()
    for conv, bn in zip(m.features[0::1], m.features[1::1]):
        if isinstance(conv, torch.nn.Conv2d):
            assert conv.bias.eq(0).all() and bn.running_mean.eq(0).all()
            assert bn.running_var.unique().tolist() == [pytest.approx(1 - 1e-5)]
    with pytest.raises(NotImplementedError, match="VGG"):
        fold_bn_(create_model("resnet56", widths=[4] * 27))


def test_snap_fp16_keeps_the_mask_and_lands_on_fp16_values():
    m = sparse_vgg()
    with torch.no_grad():
        m.features[0].weight.view(-1)[torch.nonzero(m.features[0].weight.view(-1))[:2, 0]] = \
            torch.tensor([1e-9, -1e-9])                   # would round to 0 in fp16
        m.features[1].weight[0] = 1e6                     # beyond fp16: stays fp32
    mask = {n: (w != 0).clone() for n, w in prunable_weights(m).items()}
    snap_fp16_(m)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, mask[n])
        assert torch.equal(w.half().float(), w)
    assert m.features[1].weight[0] == 1e6 and torch.equal(m.features[1].weight[1:].half().float(), m.features[1].weight[1:])
    tiny = m.features[0].weight[(m.features[0].weight != 0) & (m.features[0].weight.abs() < 1e-6)]
    assert sorted(tiny.tolist()) == [-2.0 ** -24, 2.0 ** -24]


def test_compact_vgg16_params_cost(tmp_path):
    """Folded + fp16 BN of the full VGG16: 2 bytes per stored scale and shift (plus the positions of
    the sparse vectors), zero conv biases, running mean/var 4 bytes each: far below 84.5 KB."""
    torch.manual_seed(0)
    m = create_model("vgg16")
    with torch.no_grad():
        for w in prunable_weights(m).values():
            w.mul_(torch.rand(w.shape) < 0.001)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 2.0)
                mod.bias.uniform_(-0.3, 0.3)
    counts = fold_bn_(m)
    snap_fp16_(m)
    path = tmp_path / "c.etm"
    save_compressed(m, path)
    rows = {r["tensor"]: r for r in tensor_bytes(path)}
    params = sum(r["bytes"] for n, r in rows.items() if n not in prunable_weights(m))
    assert counts["channels"] == 4224
    scale_shift = sum(r["bytes"] for n, r in rows.items() if n.endswith((".weight", ".bias"))
                      and n not in prunable_weights(m) and not n.startswith("classifier"))
    assert scale_shift <= 2 * 2 * counts["stored"] + 2 * 13 * 80    # fp16 values + sparse positions
    assert params == byte_report(path)["params"] < 20_000
    assert all(rows[f"features.{i}.running_var"]["enc"] == "const" for i in (1, 4, 8))


def test_storage_refuses_unquantized_or_parametrized_models(tmp_path):
    m = sparse_vgg()
    with pytest.raises(ValueError, match="quantize the model first"):
        save_compressed(m, tmp_path / "a.etm", quant=QuantSpec(2))
    quantize_(m, QuantSpec(2))
    with pytest.raises(ValueError, match="bake_"):
        save_compressed(m, tmp_path / "b.etm", quant=QuantSpec(2))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- the row recipe (smoke)

@pytest.mark.parametrize("latent_epochs", [0, 3])
def test_quant_row_smoke_ships_exactly_the_measured_model(tmp_path, monkeypatch, latent_epochs):
    """run_quant_row end to end on a small sparse VGG16 standing in for row 03's file: the shipped
    file keeps the start mask, holds <= 4 values per 16x4 block, records the paper-style ratio and
    loads back bit for bit (the recipe itself checks that last point and raises otherwise); with
    mode B first (``latent_epochs``), smoke mode runs one epoch in each mode."""
    from elastictrain import data
    from elastictrain.quant import recipe as qr
    from elastictrain.train import TrainConfig
    try:
        data.load_split("cifar10", train=False)
    except data.DatasetMissingError as e:
        pytest.skip(str(e))
    start = sparse_vgg(density=0.05)
    save_compressed(start, tmp_path / "S.etm", {"accuracy": 50.0})
    from elastictrain import evaluation
    monkeypatch.setattr(evaluation, "trained_models_dir", lambda: tmp_path)  # where load_shipped looks
    spec = QuantSpec(2, WORKLOAD)
    r = qr.run_quant_row(qr.QuantRecipe(row="E6", base="S", spec=spec, train=TrainConfig(epochs=3, lr=0.01),
                                        latent_epochs=latent_epochs, smoke_train_images=128, smoke_test_images=100),
                         smoke=True, device="cpu", progress=False)
    assert len(r.history) == 2 and r.path.parent != tmp_path and r.base["base_accuracy"] == 50.0
    shipped = load_compressed(r.path)
    groups = group_table(shipped, spec.structure)
    assert int(groups.max_unique.max()) <= 4
    for n, w in prunable_weights(shipped).items():
        assert torch.equal(w != 0, prunable_weights(start)[n] != 0), n
        assert torch.equal(w.half().float(), w)
    total = sum(w.numel() for w in prunable_weights(start).values())
    nonzero = sum(int((w != 0).sum()) for w in prunable_weights(start).values())
    assert shipped.meta["ratio"] == pytest.approx(total / nonzero * 16) and shipped.meta["bits"] == 2
    assert shipped.meta["test_images"] == 100 and shipped.meta["smoke"] is True
    assert shipped.meta["latent_epochs"] == min(latent_epochs, 1)
    with pytest.raises(ValueError, match="teacher"):
        qr.QuantRecipe(row="E6", base="S", spec=spec, train=TrainConfig(distill_alpha=0.5))
    with pytest.raises(ValueError, match="latent_epochs"):
        qr.QuantRecipe(row="E6", base="S", spec=spec, train=TrainConfig(epochs=3), latent_epochs=4)


def test_quant_row_refuses_a_residual_base_before_training(tmp_path, monkeypatch):
    """BN folding is VGG-only and runs after fine-tuning: a ResNet base is refused before k-means and
    ``fit``, so no training time is lost."""
    from elastictrain import evaluation
    from elastictrain.quant import recipe as qr
    from elastictrain.train import TrainConfig
    save_compressed(create_model("resnet56", widths=[4] * 27), tmp_path / "S.etm", {"accuracy": 50.0})
    monkeypatch.setattr(evaluation, "trained_models_dir", lambda: tmp_path)
    for step in ("quantize_", "snap_", "make_loaders", "fit"):
        monkeypatch.setattr(qr, step, lambda *a, _s=step, **k: pytest.fail(f"{_s} ran before the refusal"))
    with pytest.raises(NotImplementedError, match="resnet56"):
        qr.run_quant_row(qr.QuantRecipe(row="E6", base="S", spec=QuantSpec(2, WORKLOAD), train=TrainConfig(epochs=1)),
                         smoke=True, device="cpu", progress=False)
