"""ImageNet pipeline without ImageNet: the ImageFolder loaders (layout errors, seeded augmentation,
rank slicing), CUP surgery on ResNet-50's bottlenecks, the ImageNet rows' paper figures, and the
dense → CUP → CUP-SS runs of scripts/train_imagenet.py on a tiny synthetic folder (one CPU process)."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from test_flops import resnet50_hand, resnet_basic_imagenet_hand

from elastictrain import imagenet
from elastictrain.cup import cup_prune
from elastictrain.cup import imagenet as I
from elastictrain.data import DatasetMissingError
from elastictrain.flops import PUBLISHED, count_flops, count_params, unpruned
from elastictrain.models import create_model
from elastictrain.storage import load_compressed
from elastictrain.train import TrainConfig, fit


@pytest.fixture(autouse=True)
def private_checkpoints_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path / "ckpts"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return imagenet.make_synthetic_imagefolder(tmp_path_factory.mktemp("imagenet"), classes=4, per_class=8, size=48)


# ------------------------------------------------------------------------------------ data

def test_synthetic_folder_layout(folder):
    for split, n in (("train", 8), ("val", 4)):
        classes = sorted(p.name for p in (folder / split).iterdir())
        assert classes == ["c000", "c001", "c002", "c003"]
        assert all(len(list((folder / split / c).glob("*.JPEG"))) == n for c in classes)


@pytest.mark.parametrize("damage, split, says", [
    ("no root", "train", "does not exist"),
    ("no val", "val", "has no class folders"),
    ("empty val", "val", "has no class folders"),
    ("val class without images", "val", "has class folders but no images"),
])
def test_missing_or_empty_split_names_the_layout(tmp_path, damage, split, says):
    root = tmp_path / "imagenet"
    if damage != "no root":
        imagenet.make_synthetic_imagefolder(root, classes=2, per_class=2, size=16)
        for f in (root / "val").rglob("*.JPEG"):
            f.unlink()
        if damage == "no val":
            for c in (root / "val").iterdir():
                c.rmdir()
            (root / "val").rmdir()
        elif damage == "empty val":
            for c in (root / "val").iterdir():
                c.rmdir()
    with pytest.raises(DatasetMissingError) as exc:
        imagenet.make_loaders(root, batch_size=2)
    msg = str(exc.value)
    assert f"no ImageNet {split} split at {(root / split).resolve()}" in msg and says in msg
    assert "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG" in msg and "valprep" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_crop_box_follows_random_resized_crop():
    rng = random.Random(0)
    for w, h in [(500, 375), (64, 72), (300, 300)]:
        for _ in range(200):
            top, left, ch, cw = imagenet._crop_box(w, h, rng)
            assert 0 <= top <= h - ch and 0 <= left <= w - cw
            assert 0.08 * w * h * 0.9 <= ch * cw <= w * h       # scale 0.08–1 (rounding allowance)
            assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1       # aspect 3/4–4/3
    # a strip no 3/4–4/3 box fits in falls back to the central crop of the widest allowed ratio
    assert imagenet._crop_box(1000, 10, random.Random(0)) == (0, 493, 10, 13)


def test_loaders_yield_device_batches_with_seeded_augmentation(folder):
    train, val = imagenet.make_loaders(folder, batch_size=8, image_size=32, workers=0)
    assert (len(train), len(val)) == (4, 2) and not train.sharded
    train.set_epoch(0)
    first = list(train)
    x, y = first[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted([c for c in range(4) for _ in range(8)])
    again = list(train)                      # the same epoch draws the same order and crops
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    train.set_epoch(1)
    assert not torch.equal(next(iter(train))[0], x)
    vx, vy = zip(*val)                       # val: deterministic, every image once, in order
    assert torch.cat(vy).tolist() == [c for c in range(4) for _ in range(4)]
    assert torch.cat(vx).shape == (16, 3, 32, 32)
    # an image's crop depends on (seed, epoch, index) only: the same key gives the same pixels
    ds = train.dataset
    assert torch.equal(ds[(3, 5)][0], ds[(3, 5)][0]) and not torch.equal(ds[(3, 5)][0], ds[(4, 5)][0])


def test_rank_slices_of_global_batches_and_shards():
    # rank r's i-th batch is part r of the i-th global batch of one process reading all of it
    one = list(imagenet.GlobalBatches(103, 12, seed=5))
    parts = [list(imagenet.GlobalBatches(103, 4, rank=r, world=3, seed=5)) for r in range(3)]
    assert len(one) == 8 and all(len(p) == 8 for p in parts)
    for i, batch in enumerate(one):
        assert sum((p[i] for p in parts), []) == batch
    # evaluation shards: every image exactly once over the ranks, no padding
    shards = [sum(imagenet.ShardBatches(103, 10, rank=r, world=4), []) for r in range(4)]
    assert sorted(j for s in shards for _, j in s) == list(range(103))
    assert [len(s) for s in shards] == [26, 26, 26, 25]


def test_a_resumed_run_sees_the_data_of_an_uninterrupted_one(folder, tmp_path):
    # The loader holds no RNG state: shuffles and crops follow from (seed, epoch), and fit sets the epoch.
    def run(epochs, path=None):
        torch.manual_seed(0)
        model = create_model("resnet18", widths=[8] * 8, num_classes=4)
        train, val = imagenet.make_loaders(folder, batch_size=8, image_size=32, workers=0, seed=3)
        cfg = TrainConfig(epochs=epochs, lr=0.05, schedule="constant", checkpoint_every=1)
        return (*fit(model, train, val, cfg, device="cpu", checkpoint_path=path, progress=False), train)

    straight, h_straight, _ = run(2)
    run(1, tmp_path / "run.pt")
    resumed, h_resumed, loader = run(2, tmp_path / "run.pt")
    assert loader.batches.epoch == 1  # the resumed run read only epoch 2 (index 1), as epoch 2
    assert h_resumed["train_loss"].tolist() == h_straight["train_loss"].tolist()
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))


# ------------------------------------------------------------------------------- CUP surgery

def test_cup_on_resnet50_changes_only_the_bottleneck_inner_widths():
    torch.manual_seed(0)
    dense = create_model("resnet50")
    pruned, table = cup_prune(dense, t=2.0)
    assert table["kept"].lt(table["original"]).sum() >= 10
    assert set(table["layer"].str.rsplit(".", n=1).str[1]) == {"conv1", "conv2"} and len(table) == 32
    dense_shapes = {k: v.shape for k, v in dense.state_dict().items()}
    for k, v in pruned.state_dict().items():
        if v.shape != dense_shapes[k]:  # conv1/bn1 out, conv2 in/out, bn2, conv3 in: nothing else
            assert k.split(".")[2] in ("conv1", "bn1", "conv2", "bn2", "conv3"), k
            if k.endswith("conv3.weight"):
                assert v.shape[0] == dense_shapes[k][0]  # conv3 keeps its (residual) output width
    widths = [tuple(w) for w in pruned.arch["kwargs"]["widths"]]
    assert count_flops(pruned) == resnet50_hand(widths)
    assert unpruned(pruned).arch == dense.arch
    assert pruned.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 1000)


# ------------------------------------------------------------------------------- rows

def test_imagenet_rows_hold_the_papers_figures():
    r = I.ROWS
    r70 = r["R50-CUP-0.70"]
    assert (r70.paper_top1, r70.paper_top5, r70.paper_fr, r70.paper_fr_readme, r70.paper_before) == (
        74.60, 92.06, 2.46, 2.47, (0.14, 0.73))
    assert (r["R18-CUP-0.80"].t, r["R18-CUP-0.80"].paper_gflops, r["R34-CUP-0.65"].paper_top1) == (0.80, 2.077, 71.99)
    assert [k for k, v in r.items() if v.source == "markdown only"] == [
        "R18-SS-0.4", "R18-SS-0.5", "R34-CUP-0.675", "R34-CUP-0.70", "R34-SS-0.3",
        "R50-CUP-0.675", "R50-CUP-0.725", "R50-SS-0.4", "R50-SS-0.5"]
    # Q12: ResNet-50 t_e = 0.03·(e − 1) + b, ResNet-18/34 0.03·e + b; budgets 3.81G / 2.12G / 4.34G
    ss = {m: next(v for v in r.values() if isinstance(v, I.ImagenetCupSSRow) and v.model == m)
          for m in ("resnet18", "resnet34", "resnet50")}
    assert [(v.offset, v.max_flops) for v in ss.values()] == [(0, 2_120_000_000), (0, 4_340_000_000),
                                                              (1, 3_810_000_000)]
    for row in r.values():  # the exact FR column is the ratio of the base's exact FLOPs and the row's
        assert math.isclose(PUBLISHED[row.model][0] / 1e9 / row.paper_gflops, row.paper_fr, abs_tol=0.011), row.id
    table = I.paper_table("resnet50")
    assert list(table["row"]) == ["R50-base", "R50-CUP-0.65", "R50-CUP-0.675", "R50-CUP-0.70", "R50-CUP-0.725",
                                  "R50-SS-0.3", "R50-SS-0.4", "R50-SS-0.5"]


def test_torchrun_command_for_a_cup_row():
    cmd = I.torchrun_command("R50-CUP-0.70", data="/in", out="/out", gpus=8, base="/out/R50-base.pt")
    assert cmd == ["torchrun", "--standalone", "--nproc_per_node=8", "scripts/train_imagenet.py", "--data", "/in",
                   "--out", "/out", "--row", "R50-CUP-0.70", "--base", "/out/R50-base.pt", "--target-fr", "2.46"]
    with pytest.raises(ValueError, match="R50-base"):
        I.torchrun_command("R50-CUP-0.70", data="/in", out="/out", gpus=8)



def test_full_mode_rows_read_finished_summaries_and_refuse_a_missing_imagenet(tmp_path):
    """The notebooks' full mode: a row whose summary exists is not launched again; without ImageNet
    nothing is launched and the message says what to set."""
    (tmp_path / "R50-base.json").write_text(json.dumps({"top1": 76.1}))
    (tmp_path / "R50-CUP-0.70.json").write_text(json.dumps({"top1": 74.6}))
    results = I.run_rows(["R50-base", "R50-CUP-0.70"], smoke=False, data="/in", out=tmp_path, gpus=8)
    assert list(results) == ["R50-base", "R50-CUP-0.70"]
    assert [r["top1"] for r in results.values()] == [76.1, 74.6]
    with pytest.raises(ValueError, match="IMAGENET"):
        I.run_rows(["R50-base"], smoke=False, data=None, out=tmp_path, gpus=8)


def test_smoke_rows_keep_only_the_bases_later_rows_need_and_leave_nothing(monkeypatch):
    """Smoke mode's files: after each row only the dense bases of CUP rows still to come stay (a
    ResNet-34 checkpoint is 85 MB: kept to the end, notebook 19's filled CI's disk), none on return."""
    seen = {}

    def fake_row(rid, run, *, match, progress):
        seen[rid] = sorted(p.name for p in run.out.iterdir()) if run.out.exists() else []
        run.out.mkdir(exist_ok=True)
        for ext in ("pt", "etm", "json"):
            (run.out / f"{rid}.{ext}").write_bytes(b"x")
        return {"row": rid, "out": run.out}

    monkeypatch.setattr(I, "run_row", fake_row)
    rows = ["R18-base", "R34-base", "R18-CUP-0.80", "R18-SS-0.3", "R34-CUP-0.60", "R34-SS-0.4"]
    results = I.run_rows(rows, smoke=True)
    assert list(results) == rows
    assert seen == {"R18-base": [], "R34-base": ["R18-base.pt"], "R18-CUP-0.80": ["R18-base.pt", "R34-base.pt"],
                    "R18-SS-0.3": ["R34-base.pt"], "R34-CUP-0.60": ["R34-base.pt"], "R34-SS-0.4": []}
    assert not results["R18-base"]["out"].parent.exists()


# ------------------------------------------------------------------------------- the runs

def test_dense_then_cup_then_cupss_on_a_synthetic_folder(folder, tmp_path):
    run = I.ImagenetRun(folder, tmp_path / "out").smoke()
    dense = I.train_dense("resnet18", run, progress=False)
    assert (dense["mode"], dense["epochs"], dense["classes"], dense["val_images"], dense["fr"]) == (
        "dense", 1, 4, 16, 1.0)
    base = tmp_path / "out" / "R18-base.pt"
    assert base.exists() and not (tmp_path / "out" / ".R18-base.run").exists()

    s = I.cup(base, run, t=0.8, name="R18-CUP-0.80", progress=False)
    shipped = load_compressed(tmp_path / "out" / "R18-CUP-0.80.etm")
    widths = shipped.arch["kwargs"]["widths"]
    assert widths == s["widths"] and sum(widths) < 1920
    assert s["flops"] == count_flops(shipped) == resnet_basic_imagenet_hand((2, 2, 2, 2), widths, num_classes=4)
    assert s["fr"] == count_flops(create_model("resnet18", num_classes=4)) / s["flops"] > 1.5
    assert s["pr"] == count_params(create_model("resnet18", num_classes=4)) / count_params(shipped)
    assert 0 <= s["before_retraining_top1"] <= 100 and s["t"] == 0.8 and s["val_images"] == 16
    assert shipped.meta["dataset"] == "imagenet" and shipped.meta["accuracy"] == round(s["top1"], 2)

    # epoch 1 prunes the random weights at t = 0.03 + 0.8 (b larger than the paper's, so that one pass
    # meets the budget)
    ss = I.cupss("resnet18", run, k=0.03, b=0.8, offset=0, max_flops=I.FLOPS_BUDGET["resnet18"], name="SS",
                 progress=False)
    assert (ss["stopped_at"], ss["offset"], ss["epochs"]) == (1, 0, 1)
    assert ss["flops"] <= 2_120_000_000 and ss["fr"] > 1.7


def test_train_imagenet_cli_fills_in_a_rows_settings_and_runs(folder, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_imagenet as cli

    def spec(*args):
        return cli.resolve(cli.parse_args(["--data", str(folder), "--out", str(tmp_path), *args]))

    assert spec("--row", "R18-SS-0.3") == {"mode": "cupss", "model": "resnet18", "name": "R18-SS-0.3", "k": 0.03,
                                           "b": 0.3, "offset": 0, "max_flops": 2_120_000_000}
    assert spec("--row", "R50-SS-0.4", "--max-flops", "4e9")["offset"] == 1
    cup = spec("--row", "R50-CUP-0.70", "--base", "b.pt")
    assert (cup["mode"], cup["t"], cup["target_fr"]) == ("cup", 0.70, None)
    cup = spec("--row", "R50-CUP-0.70", "--base", "b.pt", "--target-fr", "2.46")
    assert (cup["t"], cup["target_fr"]) == (None, 2.46)
    with pytest.raises(SystemExit, match="--base"):
        spec("--row", "R50-CUP-0.70")
    cli.main(["--data", str(folder), "--out", str(tmp_path), "--row", "R34-base", "--epochs", "1", "--batch-size", "8",
              "--image-size", "32", "--workers", "0", "--cpu"])
    summary = json.loads((tmp_path / "R34-base.json").read_text())
    assert (summary["mode"], summary["model"], summary["global_batch"], summary["world_size"]) == (
        "dense", "resnet34", 8, 1)
    assert {p.name for p in tmp_path.iterdir()} == {"R34-base.json", "R34-base.pt", "R34-base.etm"}
    assert '"top1"' in capsys.readouterr().out
