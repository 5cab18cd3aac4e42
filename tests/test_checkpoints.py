"""Tests for elastictrain.checkpoints. Every test points ELASTICTRAIN_CHECKPOINTS at a temp folder,
so the repository's real checkpoints/MANIFEST is never read or modified."""
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from elastictrain import checkpoints as ck
from elastictrain.baselines import DENSE
from elastictrain.checkpoints import CheckpointError
from elastictrain.models import create_model


@pytest.fixture(autouse=True)
def ckpt_dir(tmp_path, monkeypatch):
    d = tmp_path / "ckpts"
    d.mkdir()
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(d))
    monkeypatch.delenv("ELASTICTRAIN_CHECKPOINT_MIRROR", raising=False)
    return d


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mlp", hidden=[20, 10])


@pytest.fixture
def saved(ckpt_dir, model):
    path = ckpt_dir / "mlp_small.pt"
    ck.save_checkpoint(path, model, epoch=3)
    return path


def write_manifest(ckpt_dir, *lines):
    (ckpt_dir / "MANIFEST").write_text("# test manifest\n" + "".join(f"{ln}\n" for ln in lines))


def test_round_trip_is_bit_identical(ckpt_dir, model):
    path = ckpt_dir / "sub" / "dir" / "m.pt"  # parent folders are created
    extra = {"acc": 0.91, "tags": ["dense", "seed0"], "mask": torch.ones(3, dtype=torch.bool),
             "nested": {"n": 1, "t": (1, 2.5)}}
    digest = ck.save_checkpoint(path, model, epoch=7, extra=extra)
    assert digest == ck.sha256_file(path) and len(digest) == 64
    raw = torch.load(path, weights_only=True)  # the whole file is weights_only-loadable
    assert raw["format"] == "elastictrain-checkpoint" and raw["version"] == 1
    rebuilt, data = ck.build_from_checkpoint(path, expected_arch="mlp")
    assert data["arch"] == {"name": "mlp", "kwargs": {"hidden": [20, 10]}} == rebuilt.arch
    assert data["epoch"] == 7 and data["optimizer"] is None and data["scheduler"] is None
    assert data["extra"]["tags"] == ["dense", "seed0"] and data["extra"]["nested"]["t"] == (1, 2.5)
    original, loaded = model.state_dict(), rebuilt.state_dict()
    assert original.keys() == loaded.keys()
    for k in original:
        assert original[k].dtype == loaded[k].dtype and torch.equal(original[k], loaded[k]), k
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), rebuilt(x))


def test_tuple_kwargs_are_stored_as_lists(ckpt_dir):
    model = create_model("mlp", hidden=(20, 10))
    path = ckpt_dir / "t.pt"
    ck.save_checkpoint(path, model)
    assert ck.load_checkpoint(path, expected_arch=model.arch)["arch"]["kwargs"] == {
        "hidden": [20, 10]}


def test_optimizer_and_scheduler_round_trip(ckpt_dir, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(8, 1, 28, 28)).sum().backward()
        opt.step()
        sched.step()
    path = ckpt_dir / "opt.pt"
    ck.save_checkpoint(path, model, epoch=3, optimizer=opt, scheduler=sched)
    model2, data = ck.build_from_checkpoint(path)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[2, 4], gamma=0.1)
    opt2.load_state_dict(data["optimizer"])
    sched2.load_state_dict(data["scheduler"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"])
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("bad", [np.float64(0.5), object(), {1.5: "float key"}])
def test_extra_must_be_weights_only_loadable(ckpt_dir, model, bad):
    path = ckpt_dir / "x.pt"
    with pytest.raises(TypeError, match=r"extra\['bad'\]"):
        ck.save_checkpoint(path, model, extra={"ok": 1, "bad": bad})
    assert list(ckpt_dir.iterdir()) == []  # nothing written, not even a temp file


def test_failed_save_leaves_old_file_and_no_temp_files(saved, model, monkeypatch):
    before = saved.read_bytes()

    def broken_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        ck.save_checkpoint(saved, model, epoch=99)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    assert ck.load_checkpoint(saved)["epoch"] == 3


@pytest.mark.parametrize("free_mib, says_disk_full", [(3, True), (10_000, False)])
def test_a_write_failing_on_a_full_disk_says_so(saved, model, monkeypatch, free_mib, says_disk_full):
    # What torch.save raised when CI's disk filled up: no word of the cause.
    def full_disk_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 49507392 vs 49507288")

    before = saved.read_bytes()
    monkeypatch.setattr(torch, "save", full_disk_save)
    usage = ck.shutil.disk_usage(saved.parent)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=free_mib << 20))
    with pytest.raises(OSError if says_disk_full else RuntimeError) as info:
        ck.save_checkpoint(saved, model, epoch=99)
    if says_disk_full:
        assert info.value.errno == errno.ENOSPC and f"with {free_mib} MiB left" in str(info.value)
        assert "unexpected pos" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    else:  # with room to spare the cause is something else: the original error, untouched
        assert type(info.value) is RuntimeError and str(info.value).startswith("[enforce fail")
    assert saved.read_bytes() == before and [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_missing_file(ckpt_dir):
    with pytest.raises(CheckpointError, match="vgg16_cifar10.pt") as e:
        ck.load_checkpoint(ckpt_dir / "vgg16_cifar10.pt")
    assert "notebooks/00_dense_baselines.ipynb" in str(e.value) and "fetch(" in str(e.value)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as e:
        ck.load_checkpoint(saved)
    assert saved.name in str(e.value) and "re-download or retrain" in str(e.value)


def test_corrupted_file(saved):
    data = bytearray(saved.read_bytes())
    mid = len(data) // 2  # inside fc1.weight: torch.load alone would return the flipped floats
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted") as e:
        ck.load_checkpoint(saved)
    assert saved.name in str(e.value)


def test_intact_file_that_fails_to_load_is_not_called_corrupt(saved):
    def out_of_memory(storage, location):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(CheckpointError, match="do not delete it") as e:
        ck.load_checkpoint(saved, map_location=out_of_memory)
    assert saved.name in str(e.value) and "corrupted" not in str(e.value) and saved.exists()


def test_bare_state_dict_is_refused(ckpt_dir, model):
    path = ckpt_dir / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="bare state_dict") as e:
        ck.load_checkpoint(path)
    assert path.name in str(e.value) and "save_checkpoint" in str(e.value)


def test_original_elastictrain_checkpoint_is_refused(ckpt_dir, model):
    path = ckpt_dir / "elastictrain_vgg16.pth"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 160}, path)
    with pytest.raises(CheckpointError, match="importer") as e:
        ck.load_checkpoint(path)
    assert path.name in str(e.value)


def test_checksum_mismatch_against_manifest(ckpt_dir, saved):
    write_manifest(ckpt_dir, f"{'0' * 64}  {saved.name}  -")
    with pytest.raises(CheckpointError, match="does not match") as e:
        ck.load_checkpoint(saved)
    assert saved.name in str(e.value) and "record_in_manifest" in str(e.value)
    ck.record_in_manifest(saved)  # regenerated on purpose: update the entry
    assert ck.verify(saved) is True and ck.load_checkpoint(saved)["epoch"] == 3


def test_verify_unlisted_returns_false(saved):
    assert ck.verify(saved) is False


def test_wrong_architecture(saved):
    with pytest.raises(CheckpointError, match="vgg16") as e:
        ck.load_checkpoint(saved, expected_arch="vgg16")
    assert saved.name in str(e.value) and "mlp" in str(e.value)
    with pytest.raises(CheckpointError, match=r"\[30, 10\]") as e:
        ck.build_from_checkpoint(saved, expected_arch={"name": "mlp",
                                                       "kwargs": {"hidden": [30, 10]}})
    assert saved.name in str(e.value)
    ck.load_checkpoint(saved, expected_arch={"name": "mlp", "kwargs": {"hidden": (20, 10)}})


def test_state_dict_that_does_not_fit(saved):
    data = torch.load(saved, weights_only=True)
    data["arch"]["kwargs"]["hidden"] = [30, 10]  # claims a wider model than the weights
    torch.save(data, saved)
    with pytest.raises(CheckpointError, match="fc1.weight") as e:
        ck.build_from_checkpoint(saved)
    assert saved.name in str(e.value)
    del data["state_dict"]["fc3.bias"]
    data["arch"]["kwargs"]["hidden"] = [20, 10]
    torch.save(data, saved)
    with pytest.raises(CheckpointError, match="missing fc3.bias"):
        ck.build_from_checkpoint(saved)


def test_malicious_pickle_is_refused_not_executed(ckpt_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = ckpt_dir / "evil.pt"
    torch.save({"format": "elastictrain-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused") as e:
        ck.load_checkpoint(path)
    assert path.name in str(e.value)
    assert not marker.exists()


def test_manifest_read_and_record(ckpt_dir, saved, tmp_path):
    other = f"{'a' * 64}  other.pt  https://example.org/other.pt  # notebooks/01_x.ipynb"
    write_manifest(ckpt_dir, other)
    ck.record_in_manifest(saved, note="notebooks/00_dense_baselines.ipynb")
    digest = ck.record_in_manifest(saved, url="https://example.org/m.pt")  # replaces, keeps note
    text = (ckpt_dir / "MANIFEST").read_text()
    assert text.startswith("# test manifest\n") and other in text and text.count(saved.name) == 1
    assert f"{digest}  {saved.name}  https://example.org/m.pt  # notebooks/00" in text
    assert ck.read_manifest() == {"other.pt": ("a" * 64, "https://example.org/other.pt"),
                                  saved.name: (digest, "https://example.org/m.pt")}
    fresh = tmp_path / "new" / "MANIFEST"
    ck.record_in_manifest(saved, manifest=fresh)
    assert fresh.read_text().startswith("#") and ck.read_manifest(fresh)[saved.name][0] == digest
    write_manifest(ckpt_dir, "not a valid line")
    with pytest.raises(CheckpointError, match="MANIFEST:2"):
        ck.read_manifest()


def test_real_manifest_lists_the_dense_baselines():
    import re
    from pathlib import Path
    real = Path(ck.__file__).resolve().parents[2] / "checkpoints" / "MANIFEST"
    entries = ck.read_manifest(real)
    assert set(entries) == {cfg.checkpoint_name for cfg in DENSE.values()} == {
        "vgg16_cifar10_dense.pt", "vgg16_cup_cifar10_dense.pt", "resnet56_cifar10_dense.pt", "mlp_mnist_dense.pt"}
    for sha, url in entries.values():
        assert re.fullmatch(r"[0-9a-f]{64}", sha) and url == "-"


def test_fetch_file_url(ckpt_dir, saved, tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    remote.mkdir()
    src = remote / saved.name
    saved.rename(src)
    ck.record_in_manifest(src, url=src.as_uri())
    dest = tmp_path / "dest"
    got = ck.fetch(saved.name, dest_dir=dest)
    assert got == dest / saved.name and got.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.iterdir()] == [saved.name]
    assert ck.fetch(saved.name, dest_dir=dest) == got  # present: no download
    # Through the mirror when the manifest says "-".
    ck.record_in_manifest(src, url="-")
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINT_MIRROR", remote.as_uri())
    assert ck.fetch(saved.name).read_bytes() == src.read_bytes()


def test_fetch_wrong_hash_keeps_nothing(ckpt_dir, saved, tmp_path):
    src = tmp_path / saved.name
    saved.rename(src)
    write_manifest(ckpt_dir, f"{'f' * 64}  {saved.name}  {src.as_uri()}")
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointError, match="sha256") as e:
        ck.fetch(saved.name, dest_dir=dest)
    assert saved.name in str(e.value)
    assert list(dest.iterdir()) == []


def test_fetch_not_hosted(ckpt_dir):
    write_manifest(ckpt_dir, f"{'b' * 64}  vgg16_cifar10.pt  -  # notebooks/00_x.ipynb")
    with pytest.raises(CheckpointError, match="no public copy") as e:
        ck.fetch("vgg16_cifar10.pt")
    assert "notebooks/00_x.ipynb" in str(e.value)
    with pytest.raises(CheckpointError, match="no public copy") as e:
        ck.fetch("unlisted.pt")
    assert "notebooks/00_dense_baselines.ipynb" in str(e.value)
    with pytest.raises(CheckpointError, match="no sha256"):
        ck.fetch("unlisted.pt", url=(ckpt_dir / "MANIFEST").as_uri())
    assert not (ckpt_dir / "unlisted.pt").exists()
    with pytest.raises(CheckpointError, match="could not download"):
        ck.fetch("vgg16_cifar10.pt", url=(ckpt_dir / "nowhere.pt").as_uri())
    with pytest.raises(ValueError, match="bare file name"):
        ck.fetch("../escape.pt")


def test_smoke_scratch_is_shared_with_child_processes_and_removed_at_exit(tmp_path):
    import subprocess
    import sys
    child = ("from elastictrain.checkpoints import scratch_dir; d = scratch_dir('child-'); "
             "(d / 'f').write_bytes(b'x'); print(d)")
    parent = f"""
import os, subprocess, sys
from elastictrain.checkpoints import scratch_dir
a, b = scratch_dir("smoke-E1-"), scratch_dir("smoke-E1-")
(a / "E1.etm").write_bytes(b"1" * 1000)
c = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, check=True).stdout.strip()
print(a, b, c, os.environ["ELASTICTRAIN_SCRATCH"], os.path.isfile(os.path.join(c, "f")), sep="\\n")
"""
    env = {k: v for k, v in os.environ.items() if k != "ELASTICTRAIN_SCRATCH"}
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, env=env)
    *paths, child_file_kept = out.stdout.split()
    a, b, c, root = map(Path, paths)
    assert a != b and a.parent == b.parent == c.parent == root and root.parent == tmp
    assert a.name.startswith("smoke-E1-") and c.name.startswith("child-")
    # the child's file outlived the child (its parent owns the root), and the root went with the parent
    assert child_file_kept == "True" and not root.exists() and list(tmp.iterdir()) == []
