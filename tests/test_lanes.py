"""scripts/lanes.py: each lane runs in its own copy, a lane can wait for another's file, and the pack
holds exactly the logs and the files the lanes changed."""
import importlib.util
import os
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lanes():
    spec = importlib.util.spec_from_file_location("lanes", ROOT / "scripts" / "lanes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def source(tmp_path):
    """A small stand-in for the repository, with the folders a copy must leave out."""
    repo = tmp_path / "repo"
    for path, text in {"src/pkg/__init__.py": "", "TrainedModels/old.etm": "old", "notebooks/n.ipynb": "{}",
                       ".git/HEAD": "ref", "data/cifar/x": "big", "out/old.log": "earlier",
                       "src/pkg/__pycache__/x.pyc": "cache", "checkpoints/vgg16.pt": "weights"}.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    old = time.time() - 3600  # as a checkout's files are: older than any lane
    for p in repo.rglob("*"):
        os.utime(p, (old, old))
    return repo


def test_parse_reads_lanes_and_skips_comments(lanes):
    assert lanes.parse("# plan\nA: echo a && echo b\n\nB-2 :  python x.py --y 'z: w'\n") == {
        "A": "echo a && echo b", "B-2": "python x.py --y 'z: w'"}


@pytest.mark.parametrize("text, message", [("A echo", "NAME: command"), ("a b: echo", "NAME: command"),
                                           ("A:   ", "NAME: command"), ("A: x\nA: y", "twice"),
                                           ("# nothing\n", "no lanes")])
def test_parse_refuses_what_would_run_wrong(lanes, text, message):
    with pytest.raises(ValueError, match=message):
        lanes.parse(text)


def test_lanes_run_in_their_own_copies_and_pack_what_they_changed(lanes, source, tmp_path):
    root = tmp_path / "lanes"
    lanes.start(root, lanes.parse(
        "A: python -c 'import sys; print(sys.path[1])' && sleep 0.3 && echo new > TrainedModels/A.etm\n"
        "B: until [ -e ../A/.lane.rc ]; do sleep 0.1; done; cp ../A/TrainedModels/A.etm TrainedModels/ && exit 3\n"),
        source=source)
    assert lanes.wait(root, timeout_s=30, out=tmp_path / "back", poll_s=0.1) == {"A": "done", "B": "failed (3)"}
    # Each lane imports its own copy's package, ahead of anything else on the path.
    assert (root / "A" / "lane.log").read_text().splitlines()[0] == str(root / "A" / "src")
    copied = {str(p.relative_to(root / "A")) for p in (root / "A").rglob("*") if p.is_file()}
    assert copied == {"src/pkg/__init__.py", "TrainedModels/old.etm", "TrainedModels/A.etm", "notebooks/n.ipynb",
                      "checkpoints/vgg16.pt", "lane.log", ".lane.json", ".lane.pid", ".lane.rc"}
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["lane-A.tar.gz", "lane-B.tar.gz"]
    with tarfile.open(tmp_path / "back" / "lane-A.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["A/TrainedModels/A.etm", "A/lane.log"]
    with tarfile.open(tmp_path / "back" / "lane-B.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["B/TrainedModels/A.etm", "B/lane.log"]
        assert tar.extractfile("B/TrainedModels/A.etm").read() == b"new\n"
    assert lanes.main(["wait", str(root)]) == 1  # a failed lane fails the call


def test_a_later_start_adds_lanes_that_wait_covers_with_the_rest(lanes, source, tmp_path):
    root = tmp_path / "lanes"
    lanes.start(root, {"A": "echo a > TrainedModels/A.etm"}, source=source)
    assert lanes.wait(root, timeout_s=30, out=None, poll_s=0.1) == {"A": "done"}
    # Added once A is done, as session 42 added lanes to a warm machine: it may read A's copy.
    lanes.start(root, {"C": "cp ../A/TrainedModels/A.etm TrainedModels/C.etm"}, source=source)
    assert lanes.wait(root, timeout_s=30, out=tmp_path / "back", poll_s=0.1) == {"A": "done", "C": "done"}
    with tarfile.open(tmp_path / "back" / "lane-C.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["C/TrainedModels/C.etm", "C/lane.log"]
        assert tar.extractfile("C/TrainedModels/C.etm").read() == b"a\n"


def test_wait_reports_running_lanes_without_waiting_for_them(lanes, source, tmp_path, capsys):
    root = tmp_path / "lanes"
    lanes.start(root, {"slow": "sleep 30"}, source=source)
    t0 = time.time()
    assert lanes.wait(root, timeout_s=0, out=None) == {"slow": "running"}
    assert time.time() - t0 < 5
    assert "== lane slow: running" in capsys.readouterr().out
    os.killpg(int((root / "slow" / ".lane.pid").read_text()), 9)


def test_start_and_wait_refuse_bad_roots(lanes, source, tmp_path, capsys):
    with pytest.raises(ValueError, match="inside the repository"):
        lanes.start(source / "lanes", {"A": "true"}, source=source)
    lanes.start(tmp_path / "lanes", {"A": "true"}, source=source)
    with pytest.raises(ValueError, match="exist already"):
        lanes.start(tmp_path / "lanes", {"A": "true"}, source=source)
    assert lanes.main(["wait", str(tmp_path / "nowhere")]) == 2
    assert "start them first" in capsys.readouterr().err
