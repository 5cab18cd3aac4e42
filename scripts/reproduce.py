"""Full reproduction: every row notebook executed in full mode, in dependency order, a few at a
time on one GPU, or on each of several.

VGG16 at batch 512 saturates an H200 on its own: five concurrent trainings each ran ~4x slower
than alone, so running more at once buys little throughput. Three at a time keeps the GPU busy
while one job is on the CPU (k-means, re-measuring a shipped file). The dense baselines are
trained once, first, because every notebook that needs one reuses their checkpoint.

    python scripts/reproduce.py --out results            # run everything, wait, report
    python scripts/reproduce.py --out results 02 03 08   # only these (their dependencies must exist)
    python scripts/reproduce.py --out results --detach   # start in the background and return
    python scripts/reproduce.py --out results --wait 500 # wait up to 500 s, print the status
    python scripts/reproduce.py --out results --gpus 4 --parallel 1   # one job per GPU, four GPUs
    python scripts/reproduce.py --out results --set 13:LABEL_SMOOTHING=0.0 13   # a variant of a row

``--set JOB:NAME=VALUE`` (repeatable) overrides a value of a notebook's ``parameters`` cell; papermill
records it in the executed notebook's ``injected-parameters`` cell. A variant writes the same row files
(``TrainedModels/``, ``checkpoints/``) as the committed recipe, so run it in a copy of the repository.

With ``--gpus N`` each job is started on the GPU with the fewest running jobs (``CUDA_VISIBLE_DEVICES``),
``--parallel`` at a time on each: since one GPU saturates at about three jobs, more GPUs, not more jobs per GPU, are
what shortens a full run (measured runs: README, ``benchmarks/results/prune_variants.md``).

Each job's log is ``<out>/<job>.log``, each executed notebook ``<out>/<notebook>.ipynb``, and
``<out>/status.json`` says which jobs are pending, running, done or failed (also those an earlier
invocation into the same ``<out>`` finished, so ``... dense-vgg16 && ... 16`` leaves ``dense-vgg16`` done
for a lane that waits on it). A GPU call is capped at
10 minutes; ``--detach`` lets the work outlive the call while later calls ``--wait`` on it.
"""
import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dense(name):
    return [sys.executable, "-c", "from elastictrain import baselines as b; "
            f"r = b.train_dense(b.DENSE[{name!r}], smoke=False, progress=False); "
            "print(f'final-epoch accuracy {r.accuracy:.2f}% in {r.train_time_s:.0f} s; sha256 {r.sha256}')"]


def _source(name) -> Path:
    # A row's notebook waits in notebooks_pending/ until its first full run has been committed.
    return next(p for d in ("notebooks", "notebooks_pending") if (p := ROOT / d / f"{name}.ipynb").exists())


def _without_injected_parameters(name) -> Path:
    """The notebook to execute: a committed execution keeps its ``injected-parameters`` cell, and papermill
    replaces that cell only when parameters are passed, so without this a run with none would execute the
    last run's values over the parameters cell's defaults."""
    source = _source(name)
    nb = json.loads(source.read_text())
    kept = [c for c in nb["cells"] if "injected-parameters" not in c["metadata"].get("tags", [])]
    if len(kept) == len(nb["cells"]):
        return source
    path = Path(tempfile.mkdtemp(prefix="reproduce-")) / source.name
    path.write_text(json.dumps({**nb, "cells": kept}, indent=1, ensure_ascii=False))
    return path


def _notebook(name, out, params=None):
    extra = ["-y", yaml.safe_dump(params)] if params else []
    return ["papermill", str(_without_injected_parameters(name)), str(out / f"{name}.ipynb"),
            "--cwd", str(ROOT / "notebooks"), "-k", "python3", "--log-output", *extra]


def _parameter_names(name) -> set:
    cells = json.loads(_source(name).read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


def parse_sets(items) -> dict:
    """``["13:LR=0.05", ...]`` -> ``{"13": {"LR": 0.05}}``: a value is a Python literal, a name one
    that the notebook's parameters cell assigns (papermill would inject a misspelt one unread)."""
    sets = {}
    for item in items:
        job, sep, assignment = item.partition(":")
        name, eq, text = assignment.partition("=")
        if not (sep and eq):
            raise ValueError(f"--set {item!r}: write JOB:NAME=VALUE, e.g. 13:LABEL_SMOOTHING=0.0")
        if job not in JOBS or JOBS[job][1] is None:
            raise ValueError(f"--set {item!r}: {job!r} is not a notebook job; those are "
                             f"{[j for j, (_, nb) in JOBS.items() if nb]}")
        known = _parameter_names(JOBS[job][1])
        if name not in known:
            raise ValueError(f"--set {item!r}: notebook {job}'s parameters are {sorted(known)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {item!r}: {text!r} is not a Python literal (quote a string: {name}='text')")
        # papermill reads YAML: a tuple would come back a list
        if yaml.safe_load(yaml.safe_dump(value)) != value:
            raise ValueError(f"--set {item!r}: use a number, string, bool, None, or a list or dict of those")
        sets.setdefault(job, {})[name] = value
    return sets


# job -> (dependencies, notebook or None for a dense baseline), in the order jobs are started:
# the longest chains first, so the last job to finish is not one that waited for a free slot.
JOBS = {
    "dense-resnet56": ([], None),
    "dense-vgg16": ([], None),
    "14": (["dense-resnet56"], "14_resnet56_cup"),
    "dense-vgg16_cup": ([], None),
    "15": ([], "15_resnet56_cupss"),
    "16": (["dense-vgg16"], "16_vgg16_robust"),
    "02": (["dense-vgg16"], "02_vgg16_500x_unstructured"),
    "04": (["dense-vgg16"], "04_vgg16_100x_kernel"),
    "03": (["02", "dense-vgg16"], "03_vgg16_1000x_unstructured"),
    "05": (["04"], "05_vgg16_500x_kernel"),
    "11": (["dense-vgg16_cup"], "11_vgg16_cup_t090"),
    "12": (["dense-vgg16_cup"], "12_vgg16_cup_t095"),
    "07": (["dense-vgg16"], "07_vgg16_balanced_50x"),
    "08": (["03"], "08_vgg16_8000x_quantized"),
    "09": (["03"], "09_vgg16_16000x_quantized"),
    "06": (["dense-vgg16"], "06_vgg16_pattern"),
    "13": ([], "13_vgg16_cupss"),
}


UNFINISHED = ("pending", "running")


def _recorded(out: Path) -> dict:
    """Job -> status as ``out/status.json`` records it ({} before the first save)."""
    path = out / "status.json"
    return json.loads(path.read_text())["status"] if path.exists() else {}


def run(selected, out: Path, parallel: int, gpus: int = 0, poll_s=5.0, sets=None):
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1")
    status = {j: "pending" for j in selected}
    # An earlier invocation's finished jobs stay in status.json: `a && b` into one --out must not erase
    # a's "done" that another lane is waiting for (session 35 lost notebook 13's wall-time line that way).
    earlier = {j: s for j, s in _recorded(out).items() if j not in selected and s not in UNFINISHED}
    running, started, finished = {}, {}, {}
    gpu = {}  # job -> the GPU it was started on (with gpus > 0)

    def save():  # atomically: --wait reads it while it is rewritten
        tmp = out / "status.json.tmp"
        tmp.write_text(json.dumps({"status": {**earlier, **status}, "elapsed_s": {
            j: round(finished.get(j, time.time()) - t0, 1) for j, t0 in started.items()}, "gpu": gpu}, indent=1))
        tmp.replace(out / "status.json")

    while any(s in UNFINISHED for s in status.values()):
        for job, proc in list(running.items()):
            if proc.poll() is not None:
                status[job] = "done" if proc.returncode == 0 else f"failed ({proc.returncode})"
                finished[job] = time.time()
                del running[job]
        for job, s in status.items():
            deps = JOBS[job][0]
            if s == "pending" and len(running) < parallel * max(gpus, 1) and all(
                    status.get(d, "done") == "done" for d in deps):
                nb = JOBS[job][1]
                cmd = _notebook(nb, out, (sets or {}).get(job)) if nb else _dense(job.split("-", 1)[1])
                job_env = env
                if gpus:  # the least loaded GPU; a dependency's checkpoint is in the shared checkpoints/ folder
                    load = [sum(gpu[j] == i for j in running) for i in range(gpus)]
                    gpu[job] = load.index(min(load))
                    job_env = dict(env, CUDA_VISIBLE_DEVICES=str(gpu[job]))
                log = open(out / f"{job}.log", "w")
                running[job] = subprocess.Popen(cmd, cwd=ROOT, env=job_env, stdout=log, stderr=subprocess.STDOUT)
                status[job], started[job] = "running", time.time()
            elif s == "pending" and any(status.get(d, "").startswith(("failed", "skipped")) for d in deps):
                status[job] = "skipped (a dependency failed)"
        save()
        time.sleep(poll_s)
    save()
    return status


def wait(out: Path, timeout_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = _recorded(out)
        if st and not any(s in UNFINISHED for s in st.values()):
            break
        time.sleep(5)
    print((out / "status.json").read_text() if (out / "status.json").exists() else "no status yet")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", nargs="*", help=f"jobs to run (default: all of {', '.join(JOBS)})")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=3, help="jobs at a time on each GPU (one GPU saturates at ~3)")
    ap.add_argument("--gpus", type=int, default=0, help="spread the jobs over this many GPUs (0: leave the device alone)")
    ap.add_argument("--detach", action="store_true", help="run in a new session and return at once")
    ap.add_argument("--wait", type=float, metavar="SECONDS", help="only wait for a detached run")
    ap.add_argument("--set", action="append", default=[], metavar="JOB:NAME=VALUE",
                    help="override a notebook parameter (repeatable), e.g. 13:LABEL_SMOOTHING=0.0")
    a = ap.parse_args()
    if a.wait is not None:
        return wait(a.out, a.wait)
    unknown = [j for j in a.jobs if j not in JOBS]
    if unknown:
        ap.error(f"unknown jobs {unknown}; known: {list(JOBS)}")
    if a.gpus < 0 or a.parallel < 1:  # before --detach, so a bad call fails here and not in the background
        ap.error("--gpus must be >= 0 and --parallel >= 1")
    try:
        sets = parse_sets(a.set)
    except ValueError as e:
        ap.error(str(e))
    idle = sorted(set(sets) - set(a.jobs or JOBS))
    if idle:
        ap.error(f"--set names jobs that this call does not run: {idle}")
    if a.detach:
        a.out.mkdir(parents=True, exist_ok=True)
        subprocess.Popen([sys.executable, __file__, "--out", str(a.out), "--parallel", str(a.parallel),
                          "--gpus", str(a.gpus), *(f"--set={x}" for x in a.set), *a.jobs],
                         start_new_session=True,
                         stdout=open(a.out / "reproduce.log", "w"), stderr=subprocess.STDOUT)
        return print(f"started in the background; follow {a.out}/status.json")
    status = run([j for j in JOBS if j in a.jobs] if a.jobs else list(JOBS), a.out, a.parallel, a.gpus, sets=sets)
    print(json.dumps(status, indent=1))
    sys.exit(any(s != "done" for s in status.values()))


if __name__ == "__main__":
    main()
