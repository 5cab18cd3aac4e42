"""Run a few command sequences ("lanes") side by side on one GPU machine, each in its own copy of the
repository, and gather what they wrote.

Two variants of a row write the same files (``TrainedModels/<row>.etm``, ``checkpoints/``), so variants
that run at once need their own working trees. A device call lasts at most 10 minutes and a session's GPU
time 30, so the lanes run detached: one call starts them, later calls wait on them and bring back what
is done, one tar per lane (at most 8 files of at most 16 MB come back from a call).

    python scripts/lanes.py start ROOT LANES        # copy the repository to ROOT/<lane> per lane, start, return
    python scripts/lanes.py wait ROOT --timeout 500 --out "$OUT"   # wait, print states and log tails, pack

LANES is a file (``-``: standard input) with one lane per line, ``NAME: shell command``; blank lines and
``#`` comments are skipped. A lane runs its command with bash in ROOT/NAME with ``src/`` of that copy
first on PYTHONPATH. A lane that needs another's product waits for it in the shell (one line each):

    A: python scripts/reproduce.py --out out dense-vgg16 && python benchmarks/robust_variants.py ...
    B: until grep -qs '"dense-vgg16": "done"' ../A/out/status.json; do sleep 10; done; cp -r ../A/checkpoints . && ...

A later ``start`` on the same ROOT adds lanes (new names only) beside those running or done, for instance
once one has finished and left the GPU to others; ``wait`` covers them all.

``wait`` packs into ``<out>/lane-<NAME>.tar.gz`` that lane's ``lane.log`` and every file under ``out/``,
``TrainedModels/``, ``notebooks/`` and ``benchmarks/results/`` that changed after it started. Stop a lane
with ``kill -- -$(cat ROOT/NAME/.lane.pid)`` (its process group).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Not copied: version control, staged wheels, the environment, datasets, earlier output; caches anywhere.
TOP_SKIP = {".git", ".gpu", ".gpujobs", ".venv", ".pytest_cache", "out", "data"}
GATHERED = ("out", "TrainedModels", "notebooks", "benchmarks/results")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse(text: str) -> dict:
    """``"A: cmd\\nB: cmd2"`` -> ``{"A": "cmd", "B": "cmd2"}``, refusing what would run wrong."""
    lanes = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        name = name.strip()
        if not sep or not _NAME.match(name) or not command.strip():
            raise ValueError(f"line {n}: write 'NAME: command' (NAME of letters, digits, _ or -), got {line!r}")
        if name in lanes:
            raise ValueError(f"line {n}: lane {name!r} is given twice; chain its commands with && on one line")
        lanes[name] = command.strip()
    if not lanes:
        raise ValueError("no lanes: give at least one line 'NAME: command'")
    return lanes


def start(root: Path, lanes: dict, source: Path = ROOT) -> None:
    root, source = root.resolve(), source.resolve()
    if root == source or source in root.parents:
        raise ValueError(f"{root} lies inside the repository {source}: each copy would copy the lanes before it")
    taken = [name for name in lanes if (root / name).exists()]
    if taken:
        raise ValueError(f"{[str(root / n) for n in taken]} exist already: pick another ROOT or remove them")
    root.mkdir(parents=True, exist_ok=True)
    for name, command in lanes.items():
        lane = root / name
        shutil.copytree(source, lane, symlinks=True, ignore=lambda folder, names: [
            n for n in names if n == "__pycache__" or (Path(folder) == source and n in TOP_SKIP)])
        (lane / ".lane.json").write_text(json.dumps({"command": command, "started": time.time()}))
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(lane / "src"), os.environ.get("PYTHONPATH")])))
        # The exit status is written by the lane's own shell, so it survives this process.
        wrapped = f"( {command} ); echo $? > .lane.rc"
        with open(lane / "lane.log", "w") as log:
            proc = subprocess.Popen(["bash", "-c", wrapped], cwd=lane, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        (lane / ".lane.pid").write_text(str(proc.pid))
        print(f"lane {name}: pid {proc.pid}, log {lane / 'lane.log'}")


def _state(lane: Path) -> str:
    rc = lane / ".lane.rc"
    text = rc.read_text().strip() if rc.exists() else ""  # empty while the shell is still writing it
    if not text:
        return "running"
    return "done" if text == "0" else f"failed ({text})"


def states(root: Path) -> dict:
    return {lane.name: _state(lane) for lane in sorted(root.iterdir()) if (lane / ".lane.json").exists()}


def _changed(lane: Path, since: float):
    for folder in GATHERED:
        base = lane / folder
        if base.is_dir():
            yield from (p for p in sorted(base.rglob("*"))
                        if p.is_file() and "__pycache__" not in p.parts and p.stat().st_mtime >= since)


def pack(root: Path, out: Path) -> list[Path]:
    """Each lane's log and the files it changed, as ``<lane>/<path>`` in ``out/lane-<lane>.tar.gz``: one tar
    per lane, since a file over 16 MB does not come back from the device (two lanes' models can pass that)."""
    out.mkdir(parents=True, exist_ok=True)
    packed = []
    for name in states(root):
        lane, target = root / name, out / f"lane-{name}.tar.gz"
        since = json.loads((lane / ".lane.json").read_text())["started"]
        with tarfile.open(target, "w:gz") as tar:
            tar.add(lane / "lane.log", f"{name}/lane.log")
            for path in _changed(lane, since):
                tar.add(path, f"{name}/{path.relative_to(lane)}")
        packed.append(target)
    return packed


def wait(root: Path, timeout_s: float, out: Path | None, tail: int = 5, poll_s: float = 5.0) -> dict:
    if not root.is_dir() or not states(root):
        raise ValueError(f"no lanes under {root}: start them first (python scripts/lanes.py start ROOT LANES)")
    deadline = time.time() + timeout_s
    while "running" in states(root).values() and time.time() < deadline:
        time.sleep(poll_s)
    now = states(root)
    for name, state in now.items():
        lines = (root / name / "lane.log").read_text(errors="replace").splitlines()
        print(f"== lane {name}: {state}")
        print("\n".join(lines[-tail:]))
    if out is not None:
        print("packed", *pack(root, out))
    return now


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start", help="copy the repository per lane and start every lane")
    s.add_argument("root", type=Path)
    s.add_argument("lanes", help="lane file, or - for standard input")
    w = sub.add_parser("wait", help="wait for the lanes, print their states and pack what they wrote")
    w.add_argument("root", type=Path)
    w.add_argument("--timeout", type=float, default=0.0, help="seconds to wait at most (0: report now)")
    w.add_argument("--out", type=Path, help="folder for the lane-<NAME>.tar.gz files (on the GPU machine: $OUT)")
    w.add_argument("--tail", type=int, default=5, help="log lines to print per lane")
    a = ap.parse_args(argv)
    try:
        if a.verb == "start":
            text = sys.stdin.read() if a.lanes == "-" else Path(a.lanes).read_text()
            start(a.root, parse(text))
            return 0
        final = wait(a.root, a.timeout, a.out, a.tail)
    except (ValueError, OSError) as e:
        print(f"lanes.py: {e}", file=sys.stderr)
        return 2
    return 0 if all(s == "done" for s in final.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
