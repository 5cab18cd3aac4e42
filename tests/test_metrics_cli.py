"""Tests for elastictrain.metrics (ModelEval-style counting) and the command line
``python -m elastictrain``. The CLI runs in a subprocess with $ELASTICTRAIN_DATA passed on."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from elastictrain import data as D
from elastictrain.__main__ import main
from elastictrain.accuracy import evaluate
from elastictrain.evaluation import format_table
from elastictrain.metrics import count_weights, dense_fp32_bytes, layer_table, paper_compression
from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights
from elastictrain.storage import load_compressed, save_compressed

VGG16_WEIGHTS = 14_715_584


def dense_vgg16(seed=0):
    """A VGG16 whose counted weights are all non-zero (an init draw can be exactly 0)."""
    torch.manual_seed(seed)
    m = create_model("vgg16")
    with torch.no_grad():
        for w in prunable_weights(m).values():
            w[w == 0] = 1e-3
    return m


# ----------------------------------------------------------------------------------------- metrics

@pytest.fixture(scope="module")
def edited_vgg16_table():
    """One VGG16 with known zeros in features.0/.3 and features.7 quantized to 4 levels; its
    layer_table is computed once (torch.unique over 14.7M weights is the slow part)."""
    m = dense_vgg16()
    with torch.no_grad():
        m.features[0].weight.view(-1)[:100] = 0   # 11 whole 3x3 kernels + 1 weight of the 12th
        m.features[3].weight[0] = 0               # filter 0: 64 kernels of 3x3
        w = m.features[7].weight
        big = w.abs() > w.abs().median()
        w.copy_(torch.sign(w) * torch.where(big, 0.2, 0.05))  # 4 levels: ±0.05, ±0.2
        w[0, 0] = 0                               # one whole kernel
    return m, layer_table(m).set_index("layer")


def test_layer_table_counts_zeros_exactly(edited_vgg16_table):
    m, t = edited_vgg16_table
    assert len(t) == 14
    assert list(t.columns) == ["shape", "weights", "nonzeros", "density", "unique_nonzero", "zero_kernels"]
    assert t.loc["features.0.weight", "shape"] == "64x3x3x3"
    assert t.loc["classifier.weight", "shape"] == "10x512"
    assert int(t["weights"].sum()) == VGG16_WEIGHTS

    r0 = t.loc["features.0.weight"]
    assert (r0.weights, r0.nonzeros) == (1728, 1628)
    assert r0.density == 1628 / 1728
    assert round(r0.zero_kernels * 192, 4) == 11  # 11 of 64 * 3 kernels
    assert r0.zero_kernels == pytest.approx(11 / 192, rel=1e-6)
    r3 = t.loc["features.3.weight"]
    assert (r3.weights, r3.nonzeros) == (36864, 36864 - 576)
    assert r3.density == 36288 / 36864
    assert r3.zero_kernels == 64 / 4096
    r7 = t.loc["features.7.weight"]
    assert (r7.nonzeros, r7.zero_kernels) == (73728 - 9, 1 / 8192)
    others = t.drop(index=["features.0.weight", "features.3.weight", "features.7.weight",
                           "classifier.weight"])
    assert (others.nonzeros == others.weights).all() and (others.density == 1.0).all()
    assert (others.zero_kernels == 0.0).all()
    assert math.isnan(t.loc["classifier.weight", "zero_kernels"])
    assert t.loc["classifier.weight", "nonzeros"] == 5120
    assert count_weights(m) == (VGG16_WEIGHTS, VGG16_WEIGHTS - 100 - 576 - 9)


def test_unique_nonzero_after_quantization(edited_vgg16_table):
    _, t = edited_vgg16_table
    assert t.loc["features.7.weight", "unique_nonzero"] == 4
    assert t.loc["features.0.weight", "unique_nonzero"] == 1628  # float draws: all distinct
    assert t.loc["features.10.weight", "unique_nonzero"] > 100_000


def test_paper_compression_50x_and_quantized():
    m = create_model("vgg16")
    keep = 294_312
    with torch.no_grad():
        left = keep
        for w in prunable_weights(m).values():  # keep the first `keep` weights in layer order
            flat = w.view(-1)
            flat.zero_()
            n = min(left, flat.numel())
            flat[:n] = 1.0
            left -= n
    assert count_weights(m) == (VGG16_WEIGHTS, keep)
    assert paper_compression(m) == VGG16_WEIGHTS / keep
    assert paper_compression(m) == pytest.approx(50.0, abs=1e-3)
    assert paper_compression(m, bits=4) == 8 * paper_compression(m)
    assert paper_compression(m, bits=2) == pytest.approx(800.0, abs=0.01)


def test_paper_compression_of_all_zero_model_raises():
    m = create_model("mlp", hidden=(8, 8))
    with torch.no_grad():
        for w in prunable_weights(m).values():
            w.zero_()
    assert count_weights(m) == (784 * 8 + 8 * 8 + 8 * 10, 0)
    with pytest.raises(ValueError, match="no non-zero"):
        paper_compression(m)


def test_dense_fp32_bytes():
    assert dense_fp32_bytes(create_model("vgg16")) == 58_862_336
    assert dense_fp32_bytes(create_model("mlp")) == 4 * (784 * 500 + 500 * 300 + 300 * 10)


# --------------------------------------------------------------------------------------------- CLI

def run_cli(*args, cwd):
    env = dict(os.environ, ELASTICTRAIN_DATA=str(D.data_root()))
    return subprocess.run([sys.executable, "-m", "elastictrain", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_cli_table_on_empty_dir(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    r = run_cli("table", "--json", "--dir", str(empty), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    assert r.stdout.strip() == "[]"


def test_cli_eval_missing_file(tmp_path):
    r = run_cli("eval", str(tmp_path / "missing.etm"), cwd=tmp_path)
    assert r.returncode == 2
    assert "no such model file" in r.stderr
    assert str(tmp_path / "missing.etm") in r.stderr
    assert r.stdout == ""


def test_cli_main_errors_in_process(tmp_path, capsys):
    bad = tmp_path / "bad.etm"
    bad.write_bytes(b"not a model at all")
    assert main(["eval", str(bad)]) == 2
    assert "not an ElasticTrain compact model" in capsys.readouterr().err
    assert main(["table", "--dir", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().out.strip() == format_table([])
    with pytest.raises(SystemExit) as exc:
        main([])  # a sub-command is required
    assert exc.value.code == 2


@pytest.fixture
def c1_dir(tmp_path):
    if not (D.data_root() / "MNIST").is_dir():
        pytest.skip(f"MNIST not found under {D.data_root()} (set ELASTICTRAIN_DATA to the torchvision data root)")
    try:
        D.load_split("mnist", False)
    except D.DatasetMissingError as e:
        pytest.skip(f"MNIST not usable under {D.data_root()}: {e}")
    folder = tmp_path / "models"
    torch.manual_seed(0)
    model = create_model("mlp", hidden=(16, 8))
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0
    save_compressed(model, folder / "C1.etm", meta={"accuracy": 12.5})
    return folder


def test_cli_table_json_with_one_model(c1_dir, tmp_path):
    path = c1_dir / "C1.etm"
    r = run_cli("table", "--json", "--dir", str(c1_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    for key in ("row", "file", "notebook", "paper_accuracy", "paper_compression", "accuracy",
                "compression", "file_bytes"):
        assert key in row, key
    assert row["row"] == "C1" and row["file"] == "C1.etm"
    assert row["notebook"] == "10_mnist_mlp_cup"
    assert (row["paper_accuracy"], row["paper_compression"]) == (98.63, 6.41)
    assert row["file_bytes"] == path.stat().st_size
    assert isinstance(row["accuracy"], float) and 0.0 <= row["accuracy"] <= 100.0
    assert row["test_images"] == 10_000
    assert row["recorded_accuracy"] == 12.5
    # the same numbers measured in this process from the file alone
    model = load_compressed(path)
    assert row["accuracy"] == round(evaluate(model, "mnist")["top1"], 2)
    total, nonzero = count_weights(model)
    assert (row["weights"], row["nonzeros"]) == (total, nonzero) == (784 * 16 + 16 * 8 + 8 * 10,
                                                                        total - 16 * 392)
    # C1 is a CUP row: its compression is the FLOPs reduction against the unpruned 784-500-300-10 MLP
    assert row["compression_kind"] == "FR"
    assert row["compression"] == pytest.approx(1_091_610 / (2 * 784 * 16 + 16 + 2 * 16 * 8 + 8 + 2 * 8 * 10 + 10 + 16 + 8))
    assert row["dense_fp32_bytes"] == 4 * 545_000   # the unpruned 784-500-300-10 MLP's weights in fp32
    assert (row["base_flops"], row["base_params"]) == (1_091_610, 545_810)


def test_cli_human_table(c1_dir, capsys):
    assert main(["table", "--dir", str(c1_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3  # header, rule, one row
    assert out[0].split()[:2] == ["row", "description"]
    assert out[2].startswith("C1 ")
    assert "98.63" in out[2]


def test_latency_is_timed_in_inference_mode_with_the_model_in_eval():
    from elastictrain.metrics import latency_ms, median_ms

    class Probe(torch.nn.Module):
        seen = []

        def forward(self, x):
            self.seen.append((torch.is_inference_mode_enabled(), self.training))
            return x

    probe = Probe()
    assert latency_ms(probe, (3, 4), reps=7) >= 0
    assert Probe.seen == [(True, False)] * 12                       # 5 warm-up calls + 7 timed
    calls = []
    assert median_ms(lambda: calls.append(1), reps=4, warmup=2) >= 0 and len(calls) == 6
