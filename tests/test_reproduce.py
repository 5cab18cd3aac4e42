"""scripts/reproduce.py schedules jobs by their dependencies and, with gpus > 0, pins each to the least loaded GPU."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def reproduce(monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # Fake jobs: each prints the GPU it sees and sleeps, so jobs started together overlap.
    script = "import os, time; print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES', '-')); time.sleep(0.4)"
    monkeypatch.setattr(mod, "_dense", lambda name: [sys.executable, "-c", script])
    # (A job without a notebook is a dense baseline named after its "dense-" prefix.)
    monkeypatch.setattr(mod, "JOBS", {"dense-a": ([], None), "dense-b": (["dense-a"], None),
                                      "dense-c": (["dense-a"], None), "dense-d": ([], None),
                                      "dense-e": (["dense-b"], None)})
    return mod


def _gpu_seen(out, job):
    return (out / f"{job}.log").read_text().split()[-1]


def test_jobs_spread_over_gpus_least_loaded_first(reproduce, tmp_path):
    status = reproduce.run(list(reproduce.JOBS), tmp_path, parallel=1, gpus=2, poll_s=0.02)
    assert set(status.values()) == {"done"}
    record = json.loads((tmp_path / "status.json").read_text())
    # a and d start together on GPUs 0 and 1; b and c wait for a, then share the two GPUs.
    assert record["gpu"]["dense-a"] == 0 and record["gpu"]["dense-d"] == 1
    assert sorted([record["gpu"]["dense-b"], record["gpu"]["dense-c"]]) == [0, 1]
    for job, g in record["gpu"].items():
        assert _gpu_seen(tmp_path, job) == str(g)
    assert len(record["gpu"]) == 5


def test_without_gpus_the_device_is_left_alone(reproduce, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    status = reproduce.run(["dense-a", "dense-b"], tmp_path, parallel=2, poll_s=0.02)
    assert status == {"dense-a": "done", "dense-b": "done"}
    assert json.loads((tmp_path / "status.json").read_text())["gpu"] == {}
    assert _gpu_seen(tmp_path, "dense-b") == "-"


def test_a_failed_dependency_skips_its_dependants(reproduce, tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "_dense", lambda name: [sys.executable, "-c", "raise SystemExit(3)"])
    status = reproduce.run(["dense-a", "dense-b", "dense-e", "dense-d"], tmp_path, parallel=1, gpus=2, poll_s=0.02)
    assert status["dense-a"] == "failed (3)" and status["dense-d"] == "failed (3)"
    assert status["dense-b"].startswith("skipped") and status["dense-e"].startswith("skipped")


def test_a_later_invocation_keeps_the_earlier_jobs_finished_status(reproduce, tmp_path, monkeypatch):
    reproduce.run(["dense-a"], tmp_path, parallel=1, poll_s=0.02)
    monkeypatch.setattr(reproduce, "_dense", lambda name: [sys.executable, "-c", "raise SystemExit(2)"])
    status = reproduce.run(["dense-d"], tmp_path, parallel=1, poll_s=0.02)
    assert status == {"dense-d": "failed (2)"}
    assert json.loads((tmp_path / "status.json").read_text())["status"] == {"dense-a": "done", "dense-d": "failed (2)"}
    # A job run again is recorded afresh, not kept from before.
    reproduce.run(["dense-a"], tmp_path, parallel=1, poll_s=0.02)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == {"dense-d": "failed (2)", "dense-a": "failed (2)"}


def test_set_parses_literals_for_parameters_the_notebook_has(reproduce, monkeypatch):
    monkeypatch.setattr(reproduce, "JOBS", {"13": ([], "13_vgg16_cupss"), "dense-vgg16": ([], None)})
    sets = reproduce.parse_sets(["13:WD_AFTER_STOP=None", "13:WEIGHT_DECAY=1e-5", "13:KS={'C4': 0.02}",
                                 "13:SIDE_BY_SIDE=True"])
    assert sets == {"13": {"WD_AFTER_STOP": None, "WEIGHT_DECAY": 1e-5, "KS": {"C4": 0.02}, "SIDE_BY_SIDE": True}}
    for bad, why in [("13:LABEL_SMOTHING=0.0", "parameters are"),   # misspelt: not in the parameters cell
                     ("dense-vgg16:EPOCHS=1", "not a notebook job"), ("14:EPOCHS=1", "not a notebook job"),
                     ("13:EPOCHS", "JOB:NAME=VALUE"), ("13:SEED=zero", "not a Python literal"),
                     ("13:KS=(1, 2)", "a list or dict")]:
        with pytest.raises(ValueError, match=why):
            reproduce.parse_sets([bad])


def test_set_reaches_the_executed_notebook_with_its_type(reproduce, tmp_path, monkeypatch):
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("WD = 5e-4\nKEEP = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(type(WD).__name__, WD, KEEP)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "toy.ipynb")
    monkeypatch.setattr(reproduce, "JOBS", {"toy": ([], "toy")})
    monkeypatch.setattr(reproduce, "_source", lambda name: tmp_path / f"{name}.ipynb")
    # 1e-05 as YAML text would be read back as a string: the float must arrive as a float
    sets = reproduce.parse_sets(["toy:WD=1e-5", "toy:KEEP={'fc1': 100}"])
    cmd = reproduce._notebook("toy", tmp_path / "out", sets["toy"])
    (tmp_path / "out").mkdir()
    subprocess.run([sys.executable, "-m", *cmd], check=True, capture_output=True, cwd=tmp_path)
    ran = nbformat.read(tmp_path / "out" / "toy.ipynb", as_version=4)
    assert ran.cells[-1].outputs[0]["text"] == "float 1e-05 {'fc1': 100}\n"


def test_a_run_without_sets_executes_the_defaults_not_the_last_runs_injected_values(reproduce, tmp_path, monkeypatch):
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("WD = 5e-4", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("WD = 1.0", metadata={"tags": ["injected-parameters"]}),  # a committed run's
        nbformat.v4.new_code_cell("print(WD)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "toy.ipynb")
    monkeypatch.setattr(reproduce, "_source", lambda name: tmp_path / f"{name}.ipynb")
    (tmp_path / "out").mkdir()
    for params, printed in [(None, "0.0005\n"), ({"WD": 0.25}, "0.25\n")]:
        cmd = reproduce._notebook("toy", tmp_path / "out", params)
        subprocess.run([sys.executable, "-m", *cmd], check=True, capture_output=True, cwd=tmp_path)
        ran = nbformat.read(tmp_path / "out" / "toy.ipynb", as_version=4)
        assert ran.cells[-1].outputs[0]["text"] == printed
        assert sum("injected-parameters" in c.metadata.get("tags", []) for c in ran.cells) == (params is not None)
    assert len(nbformat.read(tmp_path / "toy.ipynb", as_version=4).cells) == 3  # the source is left as it was
