"""CUP: features, clustering, representatives and surgery, with exact numbers."""
import dataclasses

import numpy as np
import pytest
import torch
from test_flops import resnet50_hand, resnet56_hand, vgg16_hand

from elastictrain.cup import cluster_keep, cup_prune, features, find_t, pairs_for
from elastictrain.flops import count_flops, count_params
from elastictrain.models import create_model


def test_cluster_keep_known_clusters_and_representatives():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    f = np.concatenate([c + 0.01 * rng.standard_normal((5, 2)) for c in centres])  # filters 0-4, 5-9, 10-14
    keep = cluster_keep(f, t=1.0)
    assert len(keep) == 3
    norms = np.linalg.norm(f, axis=1)
    expected = [g * 5 + int(np.argmax(norms[g * 5:(g + 1) * 5])) for g in range(3)]
    assert keep.tolist() == sorted(expected)
    assert len(cluster_keep(f, t=0.0)) == 15          # nothing identical: everything stays
    assert len(cluster_keep(f, t=1e6)) == 1           # one cluster, never zero
    assert cluster_keep(f, n_keep=3).tolist() == sorted(expected)   # manual mode, same clusters
    assert len(cluster_keep(f[:1], t=5.0)) == 1
    with pytest.raises(ValueError, match="exactly one"):
        cluster_keep(f, t=1.0, n_keep=3)


def test_representative_ties_take_lowest_index():
    f = np.array([[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]])  # 0 and 1: same norm, one cluster at t=2
    assert cluster_keep(f, t=2.0).tolist() == [0, 2]


def test_feature_layouts():
    w = torch.randn(6, 4, 3, 3)
    w_next = torch.randn(5, 6, 3, 3)
    b = torch.randn(6)
    f = features(w, b, w_next)
    assert f.shape == (6, 4 + 5 + 1)
    assert np.allclose(f[2, :4], w[2].flatten(1).norm(dim=1).numpy())     # incoming kernel norms
    assert np.allclose(f[2, 4:9], w_next[:, 2].flatten(1).norm(dim=1).numpy())  # outgoing
    assert f[2, 9] == pytest.approx(float(b[2]))
    lin, lin_next = torch.randn(7, 3), torch.randn(2, 7)
    g = features(lin, None, lin_next)                                      # raw signed weights
    assert np.allclose(g, torch.cat([lin, lin_next.T], 1).numpy())
    h = features(w, None, torch.randn(10, 6))                             # conv -> linear, fm = 1
    assert (h[:, 4:] >= 0).all() and h.shape == (6, 14)


def test_prunable_layers_per_model():
    assert len(pairs_for(create_model("vgg16_cup"))) == 13
    assert pairs_for(create_model("vgg16_cup"))[-1].next == "classifier"
    assert len(pairs_for(create_model("resnet56"))) == 27
    assert len(pairs_for(create_model("resnet18"))) == 8
    assert len(pairs_for(create_model("resnet34"))) == 16
    r50 = pairs_for(create_model("resnet50"))
    assert len(r50) == 32 and r50[1].layer == "layer1.0.conv2" and r50[1].next == "layer1.0.conv3"
    assert [p.layer for p in pairs_for(create_model("mlp"))] == ["fc1", "fc2"]


@pytest.mark.parametrize("name, shape", [("vgg16_cup", (3, 32, 32)), ("resnet56", (3, 32, 32)),
                                         ("mlp", (1, 28, 28))])
def test_t_zero_changes_nothing(name, shape):
    torch.manual_seed(0)
    m = create_model(name).eval()
    p, table = cup_prune(m, t=0.0)
    assert (table["kept"] == table["original"]).all()
    x = torch.rand(3, *shape)
    with torch.no_grad():
        assert torch.equal(p(x), m(x))


def test_exact_duplicates_merge_and_output_is_unchanged():
    """Filters 8g..8g+7 of the first conv are exact copies whose outgoing weights are all zero:
    they cluster at any t > 0, one representative (the lowest index) stays, the output is unchanged."""
    torch.manual_seed(0)
    m = create_model("vgg16_cup").eval()
    with torch.no_grad():
        conv, bn, nxt = m.features[0], m.features[1], m.features[3]
        for g in range(8):
            s = slice(8 * g, 8 * g + 8)
            conv.weight[s] = conv.weight[8 * g]
            conv.bias[s] = conv.bias[8 * g]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[s] = t[8 * g]
        nxt.weight[:, :] *= (torch.arange(64) % 8 == 0).float()[None, :, None, None]
        nxt.weight[:, ::8] = 0.0  # group representatives feed nothing either
    p, table = cup_prune(m, t=1e-6)
    assert table.loc[0, "kept"] == 8 and (table["kept"][1:] == table["original"][1:]).all()
    assert p.features[0].out_channels == 8 and p.features[3].in_channels == 8
    assert torch.equal(p.features[0].weight, m.features[0].weight[::8])
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(p(x), m(x), atol=1e-6)


def test_slicing_is_consistent():
    torch.manual_seed(0)
    m = create_model("vgg16_cup")
    p, table = cup_prune(m, t=0.4)
    assert table["kept"].min() >= 1 and table["kept"].lt(table["original"]).any()
    widths = p.arch["kwargs"]["widths"]
    assert widths == table["kept"].tolist()
    assert count_flops(p) == vgg16_hand(widths)
    assert p.classifier.in_features == widths[-1]
    assert m.arch["kwargs"] == {} and m.features[0].out_channels == 64   # the original is untouched


@pytest.mark.parametrize("name, t, hand", [("vgg16_cup", 0.5, vgg16_hand), ("resnet56", 1.2, resnet56_hand)])
def test_padded_widths_are_multiples_of_8_and_compute_the_same_function(name, t, hand):
    from elastictrain.cup.speed import pad_widths
    torch.manual_seed(0)
    m = create_model(name)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):   # statistics that matter
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    p, table = cup_prune(m, t=t)
    p.eval()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    padded = pad_widths(p).eval()
    kept, widths = table["kept"].tolist(), padded.arch["kwargs"]["widths"]
    assert any(k % 8 for k in kept)                               # there is something to pad
    assert widths == [min(-(-k // 8) * 8, o) for k, o in zip(kept, table["original"])]
    assert count_flops(padded) == hand(widths)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(padded(x), p(x), atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in p.state_dict().items())   # the input is untouched
    with pytest.raises(ValueError, match="multiple"):
        pad_widths(p, 0)


def test_rounded_widths_keep_every_representative_of_t():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    f = np.concatenate([c + 0.01 * rng.standard_normal((5, 2)) for c in centres])  # 3 clusters of 5 at t=1
    plain = set(cluster_keep(f, t=1.0).tolist())
    assert len(plain) == 3
    for multiple, n in ((1, 3), (3, 3), (4, 4), (8, 8), (16, 15)):   # 16 > 15 filters: all of them
        keep = cluster_keep(f, t=1.0, multiple=multiple)
        assert len(keep) == n and plain <= set(keep.tolist())
    assert cluster_keep(f, t=1e6, multiple=8).size == 8          # one cluster at t, rounded up to 8
    for bad in ({"t": 1.0, "multiple": 0}, {"n_keep": 3, "multiple": 8}):
        with pytest.raises(ValueError, match="multiple"):
            cluster_keep(f, **bad)


@pytest.mark.parametrize("name, t, hand", [("vgg16_cup", 0.5, vgg16_hand), ("resnet56", 1.2, resnet56_hand)])
def test_cup_prune_with_multiple_8_keeps_rounded_real_filters(name, t, hand):
    torch.manual_seed(0)
    m = create_model(name)
    plain, plain_table = cup_prune(m, t=t)
    p, table = cup_prune(m, t=t, multiple=8)
    assert any(k % 8 for k in plain_table["kept"])                 # plain CUP's widths need rounding here
    assert all(k % 8 == 0 or k == o for k, o in zip(table["kept"], table["original"]))
    widths = p.arch["kwargs"]["widths"]
    assert widths == table["kept"].tolist() and count_flops(p) == hand(widths)
    assert count_flops(p) > count_flops(plain)
    # The first layer sees the same features either way: its width is plain CUP's rounded up, and
    # every filter plain CUP kept is kept (no zero filter: these are trained ones).
    first = next(x for x in p.modules() if isinstance(x, torch.nn.Conv2d))
    first_plain = next(x for x in plain.modules() if isinstance(x, torch.nn.Conv2d))
    assert first.out_channels == -(-first_plain.out_channels // 8) * 8
    assert all(any(torch.equal(w, v) for v in first.weight) for w in first_plain.weight)
    assert all(first.weight.flatten(1).norm(dim=1) > 0)
    assert p.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    t8, fr8 = find_t(m, 2.0, t_max=5.0, iters=12, multiple=8)       # the FR search prunes the same way
    at_t8 = cup_prune(m, t=t8, multiple=8)[1]
    assert fr8 >= 2.0 and all(k % 8 == 0 or k == o for k, o in zip(at_t8["kept"], at_t8["original"]))


def test_huge_t_keeps_one_filter_per_layer():
    for name, shape in [("vgg16_cup", (3, 32, 32)), ("resnet56", (3, 32, 32))]:
        p, table = cup_prune(create_model(name), t=1e9)
        assert (table["kept"] == 1).all()
        assert p.eval()(torch.rand(2, *shape)).shape == (2, 10)


def test_resnet_pruning_keeps_residual_shapes_and_hand_flops():
    torch.manual_seed(0)
    m = create_model("resnet56")
    p, _ = cup_prune(m, t=1.2)
    assert count_flops(p) == resnet56_hand(p.arch["kwargs"]["widths"])
    for blk_p, blk_m in zip(p.layer3, m.layer3):
        assert blk_p.conv2.out_channels == blk_m.conv2.out_channels == 64
    m50 = create_model("resnet50")
    p50, t50 = cup_prune(m50, t=2.0)
    assert t50["kept"].lt(t50["original"]).any()
    widths = p50.arch["kwargs"]["widths"]
    assert count_flops(p50) == resnet50_hand([tuple(w) for w in widths])
    assert p50.layer4[0].conv3.out_channels == 2048 and p50.layer4[0].downsample[0].out_channels == 2048
    assert p50.eval()(torch.rand(1, 3, 224, 224)).shape == (1, 1000)


def test_mnist_manual_mode_matches_the_paper_counts():
    m = create_model("mlp")
    p, _ = cup_prune(m, keep={"fc1": 100, "fc2": 60})
    assert count_params(p) == 85_170 and count_flops(p) == 170_330   # cup.md §2.3
    assert count_flops(m) / count_flops(p) == pytest.approx(6.41, abs=0.005)


def test_bias_slicing_and_the_faithful_bug():
    torch.manual_seed(0)
    m = create_model("mlp")
    p, _ = cup_prune(m, keep={"fc1": 100, "fc2": 60})
    kept = [int(i) for i in range(500) if any(torch.equal(m.fc1.weight[i], r) for r in p.fc1.weight[:3])]
    assert torch.equal(p.fc1.bias[:3], m.fc1.bias[kept])
    q, _ = cup_prune(m, keep={"fc1": 100, "fc2": 60}, faithful_bias_bug=True)
    assert torch.equal(q.fc1.weight, p.fc1.weight) and not torch.equal(q.fc1.bias, p.fc1.bias)


def test_find_t_reaches_the_target_fr():
    torch.manual_seed(0)
    m = create_model("resnet56")
    t, fr = find_t(m, 2.0, t_max=5.0, iters=20)
    assert fr >= 2.0
    base = count_flops(m)
    assert base / count_flops(cup_prune(m, t=t * 0.98)[0]) <= fr
    with pytest.raises(ValueError, match="raise t_max"):
        find_t(m, 1e6, t_max=0.5, iters=2)


def _tiny_mnist(n=512):
    from elastictrain.data import GpuLoader, Split
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g), "tiny")
    return GpuLoader(split, 64, train=True, seed=0)


def _fit_ss(epochs, path=None, seen=None, multiple=1, b=0.0, max_params=100_000, max_flops=None, sam_rho=0.0):
    from elastictrain.cup import CupSS
    from elastictrain.train import Callback, TrainConfig, fit

    class Watch(Callback):
        def after_epoch(self, state):
            if seen is not None:
                # the optimiser itself, not its id: a freed optimiser's id can be reused by a later one
                seen.append((state.epoch, state.optimizer, tuple(state.model.arch["kwargs"].get("hidden", ()))))

    torch.manual_seed(0)
    ss = CupSS(k=0.5, b=b, offset=1, max_params=max_params, max_flops=max_flops, multiple=multiple)
    cfg = TrainConfig(epochs=epochs, lr=0.05, nesterov=False, weight_decay=1e-4, schedule="step",
                      milestones=(80, 120), checkpoint_every=1, sam_rho=sam_rho)
    model, hist = fit(create_model("mlp"), _tiny_mnist(), None, cfg, callbacks=[ss, Watch()],
                      checkpoint_path=path, progress=False)
    return model, hist, ss


def test_cup_ss_prunes_during_training_until_the_budget():
    seen = []
    model, hist, ss = _fit_ss(6, seen=seen)
    assert list(hist["t"].dropna()) == [0.5 * (e - 1) for e in range(1, ss.stopped_at + 1)]
    assert ss.stopped_at is not None and hist["params"].iloc[-1] <= 100_000
    assert hist["params"].is_monotonic_decreasing
    assert hist["params"].iloc[ss.stopped_at - 1] == hist["params"].iloc[-1]   # frozen after the stop
    assert count_params(model) == hist["params"].iloc[-1]
    assert model.arch["kwargs"]["hidden"][0] < 500
    # a brand-new optimiser at every pruning epoch, the same one afterwards (quirk Q11)
    opt_ids = [id(o) for _, o, _ in seen]
    assert len(set(opt_ids[:ss.stopped_at])) == ss.stopped_at
    assert len(set(opt_ids[ss.stopped_at - 1:])) == 1


def test_cup_ss_with_sam_trains_through_every_architecture_change():
    """SAM's second pass runs on whatever model CUP-SS has just built (and on its fresh optimiser)."""
    model, hist, ss = _fit_ss(6, sam_rho=0.05)
    plain = _fit_ss(6)[1]
    assert ss.stopped_at is not None and hist["params"].iloc[-1] <= 100_000
    assert count_params(model) == hist["params"].iloc[-1]
    assert hist["train_loss"].notna().all() and (hist["train_loss"] < 10).all()
    assert not hist["train_loss"].equals(plain["train_loss"])  # the steps did change


def test_cup_ss_with_a_negative_b_starts_pruning_later_on_the_same_slope():
    model, hist, ss = _fit_ss(8, b=-1.0)
    assert list(hist["t"].dropna()) == [0.5 * (e - 1) - 1.0 for e in range(1, ss.stopped_at + 1)]
    # t <= 0 at epochs 1-3: no two filters of a trained layer coincide, so nothing goes before epoch 4
    assert (hist["params"].iloc[:3] == count_params(create_model("mlp"))).all()
    b0 = _fit_ss(8)[2]
    assert ss.stopped_at is not None and b0.stopped_at < ss.stopped_at and hist["params"].iloc[-1] <= 100_000


def test_cup_ss_resumes_with_the_pruned_architecture(tmp_path):
    straight, h1, _ = _fit_ss(5)
    _fit_ss(3, tmp_path / "run.pt")
    resumed, h2, _ = _fit_ss(5, tmp_path / "run.pt")
    assert resumed.arch == straight.arch
    assert list(h2["params"]) == list(h1["params"])


def test_cup_ss_with_both_budgets_prunes_on_until_both_hold():
    # the MLP at k = 0.5: 545,810 params (1,091,610 FLOPs) until t = 1.0 leaves 226,389 (452,768), then t = 1.5 807
    _, alone, p = _fit_ss(6, max_params=300_000)
    assert p.stopped_at == 3 and alone["flops"].iloc[-1] == 452_768
    model, hist, ss = _fit_ss(6, max_params=300_000, max_flops=400_000)
    assert ss.stopped_at == 4 and hist["params"].iloc[2] <= 300_000   # params alone would have stopped at epoch 3
    assert hist["flops"].iloc[-1] <= 400_000 and count_flops(model) == hist["flops"].iloc[-1]
    assert (hist["params"].iloc[3:] == count_params(model)).all()


def test_cup_ss_row_refuses_an_impossible_min_fr():
    from elastictrain.cup import cifar
    row = cifar.CupSSRow("C4", "vgg16_cup", "vgg16", k=0.02, batch_size=64, max_params=900_000, min_fr=3.06,
                         train=cifar.SS_TRAIN)
    with pytest.raises(ValueError, match="FR above 1"):
        dataclasses.replace(row, min_fr=1.0)
    with pytest.raises(ValueError, match="not beside max_flops"):
        dataclasses.replace(row, max_flops=200_000_000)


def test_cup_ss_needs_a_budget():
    from elastictrain.cup import CupSS
    with pytest.raises(ValueError, match="give a budget"):
        CupSS(0.02)
    with pytest.raises(ValueError, match="multiple"):
        CupSS(0.02, max_params=100_000, multiple=0)


def test_cup_ss_with_multiple_8_rounds_every_pass():
    from elastictrain.cup.cluster import rounded_width
    plain_seen, seen = [], []
    _fit_ss(6, seen=plain_seen)
    model, hist, ss = _fit_ss(6, seen=seen, multiple=8)
    full = (500, 300)
    plain = [h for _, _, h in plain_seen]
    ours = [h for _, _, h in seen]
    assert ss.stopped_at is not None and hist["params"].iloc[-1] <= 100_000
    assert all(k % 8 == 0 or k == n for h in ours for k, n in zip(h, full))
    assert any(k % 8 for h in plain for k in h if k not in full)         # plain CUP-SS's widths need rounding
    # Both runs are identical until plain CUP-SS first prunes; that pass sees the same weights, so
    # its widths are plain CUP-SS's rounded up to multiples of 8 (the added filters are trained ones).
    i = next(i for i, h in enumerate(plain) if h != full)
    assert ours[:i] == plain[:i]
    assert ours[i] == tuple(rounded_width(k, 8, n) for k, n in zip(plain[i], full)) != plain[i]


def test_rank_prune_keeps_the_largest_norms_or_a_seeded_random_set():
    from elastictrain.cup import rank_prune
    torch.manual_seed(0)
    m = create_model("mlp")
    keep = {"fc1": 100, "fc2": 60}
    rows = torch.cat([m.fc1.weight, m.fc1.bias[:, None]], 1)
    for crit, p in (("l1", 1), ("l2", 2)):
        pruned, table = rank_prune(m, keep, crit)
        assert table["kept"].tolist() == [100, 60]
        expected = rows.norm(p=p, dim=1).argsort(descending=True)[:100].sort().values
        assert torch.equal(pruned.fc1.weight, m.fc1.weight[expected])
        assert pruned.fc2.weight.shape == (60, 100)
    a = rank_prune(m, keep, "random", seed=1)[0]
    b = rank_prune(m, keep, "random", seed=1)[0]
    c = rank_prune(m, keep, "random", seed=2)[0]
    assert torch.equal(a.fc1.weight, b.fc1.weight) and not torch.equal(a.fc1.weight, c.fc1.weight)
    with pytest.raises(ValueError, match="criterion"):
        rank_prune(m, keep, "l3")


def test_mnist_comparison_smoke_never_touches_trained_models():
    from elastictrain.cup.recipe import mnist_comparison
    from elastictrain.data import DatasetMissingError
    from elastictrain.evaluation import trained_models_dir
    from elastictrain.storage import read_header
    before = sorted(p.name for p in trained_models_dir().iterdir())
    try:
        table, models, path = mnist_comparison({"fc1": 100, "fc2": 60}, smoke=True, progress=False)
    except DatasetMissingError as e:
        pytest.skip(str(e))
    assert sorted(p.name for p in trained_models_dir().iterdir()) == before
    assert trained_models_dir() not in path.parents
    assert table["method"].tolist() == ["dense", "CUP", "random", "L2", "L1", "CUP, original's bias bug (Q1)"]
    assert table["FR"][1:].round(4).eq(round(1_091_610 / 170_330, 4)).all()
    assert table["params"][1:].eq(85_170).all()
    meta = read_header(path)["meta"]
    assert meta["smoke"] is True and meta["ratio"] == pytest.approx(1_091_610 / 170_330)
    assert set(models) == {"dense", "CUP", "random", "L2", "L1"}


def test_latency_and_cup_plots():
    from elastictrain.metrics import latency_ms
    from elastictrain.plots import dendrogram, kept_filters
    import pandas as pd
    m = create_model("mlp")
    assert latency_ms(m, (1, 28, 28), batch=2, reps=3) > 0
    fig = kept_filters(pd.DataFrame({"layer": ["a", "b"], "original": [10, 8], "kept": [3, 8]}))
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 4
    f = features(m.fc2.weight, None, m.fc3.weight)
    fig = dendrogram(f, n_keep=60)
    cut = fig.axes[0].lines[-1].get_ydata()[0]
    from scipy.cluster.hierarchy import fcluster, linkage
    assert len(np.unique(fcluster(linkage(f, "ward"), cut, "distance"))) == 60   # the drawn cut leaves 60


# ---- CIFAR rows (cup/cifar.py), CUP-SS compile deferral, latency comparison ----

def test_cup_ss_defers_compile_while_pruning_and_raises_wd_after_the_stop():
    from elastictrain.cup import CupSS
    from elastictrain.train import Callback, TrainConfig, fit
    seen = []

    class Watch(Callback):
        def after_epoch(self, state):
            seen.append((state.epoch, state.defer_compile, state.optimizer.param_groups[0]["weight_decay"]))

    torch.manual_seed(0)
    ss = CupSS(k=0.5, max_params=100_000, wd_after_stop=5e-4)
    cfg = TrainConfig(epochs=6, lr=0.05, nesterov=False, weight_decay=1e-4, schedule="constant")
    fit(create_model("mlp"), _tiny_mnist(), None, cfg, callbacks=[ss, Watch()], progress=False)
    s = ss.stopped_at
    assert s is not None and 1 < s < 6
    assert [d for _, d, _ in seen] == [True] * (s - 1) + [False] * (6 - s + 1)
    assert [w for _, _, w in seen] == [1e-4] * (s - 1) + [5e-4] * (6 - s + 1)


def _tiny(cfg, **kw):
    return dataclasses.replace(cfg, smoke_train_images=128, smoke_test_images=64, **kw)


def test_run_cupss_rows_side_by_side_equals_one_after_the_other(monkeypatch):
    from elastictrain.cup import cifar
    from elastictrain.data import DatasetMissingError
    rows = [_tiny(cifar.CupSSRow(rid, "resnet56", "resnet56", k=k, train=cifar.SS_TRAIN, batch_size=256,
                                 max_flops=120_000_000)) for rid, k in (("C8", 100.0), ("C6", 0.0))]
    # Side by side first, with no scratch folder yet, as in a notebook kernel: the children must
    # write into one that outlives them.
    monkeypatch.delenv("ELASTICTRAIN_SCRATCH", raising=False)
    reported = []
    try:
        together = cifar.run_cupss_rows(rows, smoke=True, side_by_side=True,
                                        report=lambda row, r: reported.append((row, r)))
    except DatasetMissingError as e:
        pytest.skip(str(e))
    alone = cifar.run_cupss_rows(rows, smoke=True, report=lambda row, r: reported.append((row, r)))
    assert list(together) == ["C8", "C6"]
    root = alone["C8"].path.parent.parent
    assert all(r.path.is_file() and r.path.parent.parent == root for r in together.values())
    # each row reported once per call, in the rows' order, with the result that call returned
    assert reported == [*together.items(), *alone.items()]
    # k = 100 meets the FLOPs budget at epoch 2, k = 0 never prunes: two different rows came back
    assert together["C8"].summary["stopped_at"] == 2 and together["C6"].summary["stopped_at"] is None
    def timeless(summary):
        return {k: v for k, v in summary.items() if not k.endswith("time_s")}
    for rid, a in alone.items():
        b = together[rid]
        assert b.accuracy == a.accuracy and timeless(b.summary) == timeless(a.summary)
        assert b.history.drop(columns="epoch_time_s").equals(a.history.drop(columns="epoch_time_s"))
        # the file does not store BatchNorm's batch counters (unused: momentum is set)
        sa, sb = ({k: v for k, v in r.model.state_dict().items() if not k.endswith("num_batches_tracked")}
                  for r in (a, b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), rid


def test_run_cupss_smoke_stops_at_the_flops_budget():
    from elastictrain.cup import cifar
    from elastictrain.data import DatasetMissingError
    from elastictrain.evaluation import trained_models_dir
    from elastictrain.storage import read_header
    before = sorted(p.name for p in trained_models_dir().iterdir())
    row = _tiny(cifar.CupSSRow("C8", "resnet56", "resnet56", k=100.0, train=cifar.SS_TRAIN, batch_size=256,
                               max_flops=120_000_000))
    try:
        r = cifar.run_cupss(row, smoke=True, progress=False)
    except DatasetMissingError as e:
        pytest.skip(str(e))
    assert sorted(p.name for p in trained_models_dir().iterdir()) == before
    s = r.summary
    # epoch 1: t = 0 keeps everything; epoch 2: t = 100 keeps one filter per block, within budget
    assert s["stopped_at"] == 2 and s["first_pruned_epoch"] == 2 and s["t_at_stop"] == 100.0
    assert r.history["t"].tolist() == [0.0, 100.0]
    assert r.history["flops"].tolist() == [253_121_802, resnet56_hand([1] * 27)]
    assert r.layers["kept"].tolist() == [1] * 27 and r.layers["original"].tolist() == [16] * 9 + [32] * 9 + [64] * 9
    assert s["flops"] == resnet56_hand([1] * 27) and s["fr"] == pytest.approx(253_121_802 / s["flops"])
    meta = read_header(r.path)["meta"]
    assert meta["smoke"] is True and meta["method"] == "CUP-SS" and meta["widths"] == [1] * 27
    assert meta["test_images"] == 64 and meta["ratio"] == pytest.approx(s["fr"])


def test_run_cupss_smoke_turns_min_fr_into_a_flops_budget_beside_the_params_one():
    from elastictrain.cup import cifar
    from elastictrain.data import DatasetMissingError
    from elastictrain.storage import read_header
    row = _tiny(cifar.CupSSRow("C8", "resnet56", "resnet56", k=100.0, train=cifar.SS_TRAIN, batch_size=256,
                               max_params=10_000_000, min_fr=2.0))
    try:
        r = cifar.run_cupss(row, smoke=True, progress=False)
    except DatasetMissingError as e:
        pytest.skip(str(e))
    s = r.summary
    # the params budget holds from the start; FR >= 2 needs epoch 2's pass (t = 100: one filter per block)
    assert s["max_flops"] == 253_121_802 // 2 and s["min_fr"] == 2.0
    assert s["stopped_at"] == 2 and s["flops"] == resnet56_hand([1] * 27)
    meta = read_header(r.path)["meta"]
    assert "budgets: params <= 10,000,000 and FLOPs <= 126,560,901 (FR >= 2.0, ours)" in cifar.shipped_extras(meta)


def test_cupss_row_distils_only_with_both_teacher_and_weight():
    from elastictrain.cup import cifar
    with pytest.raises(ValueError, match="a teacher needs train.distill_alpha > 0"):
        cifar.CupSSRow("C8", "resnet56", "resnet56", k=0.02, train=cifar.SS_TRAIN, batch_size=256, teacher="resnet56")
    with pytest.raises(ValueError, match="a teacher needs"):
        cifar.CupSSRow("C8", "resnet56", "resnet56", k=0.02, batch_size=256,
                       train=dataclasses.replace(cifar.SS_TRAIN, distill_alpha=0.9))
    with pytest.raises(ValueError, match="teacher must be one of"):
        cifar.CupSSRow("C8", "resnet56", "resnet56", k=0.02, batch_size=256, teacher="resnet57",
                       train=dataclasses.replace(cifar.SS_TRAIN, distill_alpha=0.9))


def test_run_cupss_smoke_with_a_teacher_records_it():
    from elastictrain.cup import cifar
    from elastictrain.data import DatasetMissingError
    from elastictrain.storage import read_header
    row = _tiny(cifar.CupSSRow("C8", "resnet56", "resnet56", k=100.0, batch_size=256, max_flops=120_000_000,
                               teacher="resnet56", train=dataclasses.replace(cifar.SS_TRAIN, distill_alpha=0.9)))
    try:
        r = cifar.run_cupss(row, smoke=True, progress=False)
    except DatasetMissingError as e:
        pytest.skip(str(e))
    s, meta = r.summary, read_header(r.path)["meta"]
    assert s["teacher"] == meta["teacher"] == "resnet56" and s["distill_alpha"] == meta["distill_alpha"] == 0.9
    assert 0 <= s["teacher_accuracy"] <= 100 and meta["teacher_accuracy"] == s["teacher_accuracy"]
    assert s["stopped_at"] == 2 and r.layers["kept"].tolist() == [1] * 27  # distilling leaves the pruning as it was


def test_run_cup_smoke_reaches_the_target_fr(monkeypatch):
    from elastictrain import baselines
    from elastictrain.cup import cifar
    from elastictrain.data import DatasetMissingError
    from elastictrain.storage import load_compressed
    import pandas as pd
    torch.manual_seed(0)
    dense = baselines.DenseResult(create_model("vgg16"), pd.DataFrame(), 10.0, 0.0, None, None)
    monkeypatch.setattr(baselines, "train_dense", lambda *a, **k: dense)   # no dense training here
    row = _tiny(cifar.CupRow("C2", "vgg16", target_fr=2.93, paper_t=0.90, train=cifar.VGG_RETRAIN,
                             batch_size=512))
    try:
        r = cifar.run_cup(row, smoke=True, progress=False)
    except DatasetMissingError as e:
        pytest.skip(str(e))
    s = r.summary
    assert s["fr"] >= 2.93 and s["t"] > 0 and s["epochs"] == 1
    widths = r.layers["kept"].tolist()
    assert len(widths) == 13 and r.model.arch["kwargs"]["widths"] == widths
    assert s["flops"] == vgg16_hand(widths) and s["fr"] == pytest.approx(627_634_698 / vgg16_hand(widths))
    # the smallest t to bisection precision: a slightly smaller t falls short of the target
    assert 627_634_698 / count_flops(cup_prune(dense.model, t=s["t"] * 0.9)[0]) < 2.93
    shipped = load_compressed(r.path)
    assert shipped.arch == r.model.arch and shipped.meta["t"] == round(s["t"], 4)
    assert 0 <= s["before_retraining"] <= 100 and 0 <= s["before_retraining_bn_recalibrated"] <= 100


def test_best_epoch_reads_the_history_and_skips_unevaluated_epochs():
    import pandas as pd
    from elastictrain.cup.cifar import best_epoch
    h = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "test_top1": [50.0, 91.0, float("nan"), 90.5, 90.9]})
    assert best_epoch(h) == (91.0, 2)
    assert best_epoch(h, after=3) == (90.9, 5)
    assert best_epoch(h, after=6) == (None, None)
    assert best_epoch(pd.DataFrame({"epoch": [1]})) == (None, None)


def test_latency_comparison_against_the_unpruned_architecture():
    from elastictrain.cup.speed import compare, to_markdown
    from elastictrain.models import input_shape
    from elastictrain.metrics import latency_ms
    import pandas as pd
    p, _ = cup_prune(create_model("mlp"), keep={"fc1": 100, "fc2": 60})
    r = compare(p, row="C1", cpu_reps=3, rounds=1)
    assert r["FR"] == pytest.approx(1_091_610 / 170_330)
    assert r["CPU bs1 speedup"] == pytest.approx(r["CPU bs1 dense ms"] / r["CPU bs1 pruned ms"])
    assert input_shape(create_model("resnet56")) == (3, 32, 32)
    assert input_shape(create_model("resnet50")) == (3, 224, 224) and input_shape(p) == (1, 28, 28)
    threads = torch.get_num_threads()
    one = compare(p, row="C1", cpu_reps=3, rounds=1, cpu_threads=1, channels_last=True)
    assert [k for k in one if k.startswith("CPU")] == [f"CPU bs1 1t cl {s}" for s in
                                                       ("dense ms", "pruned ms", "speedup", "speedup/FR")]
    assert torch.get_num_threads() == threads                  # the caller's setting is restored
    padded = compare(p, cpu_reps=3, rounds=1, pad_to=8)
    assert "CPU bs1 pad8 speedup" in padded and padded["FR padded"] < padded["FR"]   # 100/60 -> 104/64
    with pytest.raises(ValueError, match="cpu_threads"):
        compare(p, cpu_threads=0)
    with pytest.raises(ValueError, match="runtime"):
        compare(p, runtime="tvm")
    with pytest.raises(ValueError, match="channels_last"):
        compare(p, runtime="onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match="ort_optimization must be one of"):
        compare(p, runtime="onnxruntime", ort_optimization="max")
    with pytest.raises(ValueError, match="needs runtime='onnxruntime'"):
        compare(p, ort_optimization="extended")
    with pytest.raises(ValueError, match="CUDA only"):
        latency_ms(p, (1, 28, 28), bf16=True)
    md = to_markdown(pd.DataFrame([{"row": "C1", "FR": 6.4088}])).splitlines()
    assert md == ["| row | FR |", "|---|---|", "| C1 | 6.409 |"]


def test_wall_time_line_says_which_gpu_the_dense_run_used(tmp_path, monkeypatch):
    """CUP-SS's wall time is compared with the dense baseline's run: on the same GPU model, or not."""
    from elastictrain import baselines, checkpoints
    from elastictrain.cup import cifar
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path))
    assert cifar.dense_training_time("vgg16") is None
    assert cifar.wall_time_line("vgg16") == "no finished dense run in checkpoints/: no wall-time comparison in this execution"
    here = baselines.environment()["device"]
    path = tmp_path / baselines.DENSE["vgg16"].checkpoint_name
    history = [{"epoch": e, "epoch_time_s": t} for e, t in ((1, 2.0), (2, 1.0), (3, 1.5))]

    def line(**device):
        checkpoints.save_checkpoint(path, create_model("vgg16", widths=[4] * 13), epoch=3,
                                    extra={"history": history, **device})
        checkpoints.record_in_manifest(path)
        return cifar.wall_time_line("vgg16")

    start = f"dense vgg16 (notebook 00): 3 epochs in 4 s (1.50 s/epoch median, compile={baselines.DENSE['vgg16'].train.compile}; "
    assert line() == start + "its GPU not recorded, maybe another)"      # a checkpoint from before session 38
    assert cifar.dense_training_time("vgg16") == {"epochs": 3, "train_time_s": 4.5, "s_per_epoch": 1.5, "device": None,
                                                  "compile": baselines.DENSE["vgg16"].train.compile}
    assert line(device=here) == start + f"the same GPU model, {here})"
    assert line(device="NVIDIA H200") == start + f"trained on NVIDIA H200, not this execution's {here})"


def test_dense_checkpoint_records_its_device(tmp_path, monkeypatch):
    from elastictrain import baselines, checkpoints
    from elastictrain import data as D
    if not (D.data_root() / "MNIST").is_dir():
        pytest.skip(f"MNIST not found under {D.data_root()} (set ELASTICTRAIN_DATA)")
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path))
    cfg = baselines.DENSE["mlp"]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, compile=None))
    r = baselines.train_dense(cfg, smoke=False, device="cpu", progress=False)
    assert checkpoints.load_checkpoint(r.checkpoint)["extra"]["device"] == baselines.environment()["device"]
