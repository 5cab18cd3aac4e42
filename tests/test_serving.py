"""Tests for elastictrain.serving: ONNX export checked in ONNX Runtime, its latency and its CLI."""
import platform

import pytest
import torch

from elastictrain import serving
from elastictrain.__main__ import main
from elastictrain.cup import cup_prune, pairs_for
from elastictrain.cup.speed import compare, summary
from elastictrain.models import create_model
from elastictrain.storage import save_compressed


def _with_random_batchnorm(model, seed=0):
    """BatchNorm away from identity, so that a wrong fold of it into the conv shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data, m.bias.data = 0.5 + torch.rand(n, generator=g), torch.randn(n, generator=g) * 0.1
            m.running_mean, m.running_var = torch.randn(n, generator=g) * 0.1, 0.5 + torch.rand(n, generator=g)
    return model


@pytest.fixture(scope="module")
def pruned_resnet56():
    m = _with_random_batchnorm(create_model("resnet56"))
    p, _ = cup_prune(m, keep={pair.layer: 3 + 5 * i % 13 for i, pair in enumerate(pairs_for(m))})
    return p


@pytest.fixture(scope="module")
def pruned_mlp():
    p, _ = cup_prune(create_model("mlp"), keep={"fc1": 100, "fc2": 60})
    return p


def test_onnx_runtime_reproduces_a_pruned_resnet56_at_any_batch(pruned_resnet56):
    widths = [m.out_channels for n, m in pruned_resnet56.named_modules() if n.endswith(".conv1")]
    assert min(widths) == 3 and len(set(widths)) == 13                # odd, non-uniform widths, as CUP leaves
    pruned_resnet56.train()
    sess = serving.session(serving.to_onnx(pruned_resnet56), threads=1)
    assert pruned_resnet56.training                                   # the export leaves the model as it was
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_inputs()[0].shape == ["batch", 3, 32, 32]
    ref = pruned_resnet56.eval()
    for batch in (1, 5):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = ref(x)
        got = serving.run(sess, x)
        assert got.shape == (batch, 10)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())
    assert serving.max_difference(ref, sess) < 1e-5


def test_the_check_is_relative_to_the_logits_scale():
    torch.manual_seed(0)
    dense = create_model("resnet56").eval()            # untrained: logits of order 1e3-1e4
    sess = serving.session(serving.to_onnx(dense))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(x)
    assert ref.abs().max() > 1e3
    assert serving.max_difference(dense, sess) == pytest.approx(
        float((serving.run(sess, x) - ref).abs().max() / ref.abs().max()))
    assert serving.max_difference(dense, sess) < 1e-5


def test_export_checked_writes_only_a_verified_graph(pruned_mlp, tmp_path, monkeypatch):
    out = tmp_path / "C1.onnx"
    data, diff = serving.export_checked(pruned_mlp, out)
    assert out.read_bytes() == data and diff < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["C1.onnx"]         # no temporary file left behind
    monkeypatch.setattr(serving, "max_difference", lambda model, sess: 0.5)
    with pytest.raises(ValueError, match="differ from PyTorch's by 0.5 of the largest"):
        serving.export_checked(pruned_mlp, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(ValueError, match="threads"):
        serving.session(data, threads=0)


def test_a_missing_onnx_package_is_named_with_the_install_command(monkeypatch):
    real = serving.importlib.import_module

    def without_onnxruntime(name):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name)
    monkeypatch.setattr(serving.importlib, "import_module", without_onnxruntime)
    with pytest.raises(ImportError, match="onnxruntime is needed.*pip install -r requirements.txt"):
        serving.session(b"")


def test_latency_comparison_in_onnx_runtime(pruned_mlp):
    threads = torch.get_num_threads()
    r = compare(pruned_mlp, row="C1", cpu_reps=5, rounds=2, cpu_threads=1, runtime="onnxruntime")
    keys = [k for k in r if k.startswith("CPU")]
    assert keys == [f"CPU bs1 ort 1t {s}" for s in ("dense ms", "pruned ms", "speedup", "speedup/FR")]
    assert r["CPU bs1 ort 1t dense ms"] > 0 and r["CPU bs1 ort 1t pruned ms"] > 0
    assert r["CPU bs1 ort 1t speedup"] == pytest.approx(r["CPU bs1 ort 1t dense ms"] / r["CPU bs1 ort 1t pruned ms"])
    assert r["CPU bs1 ort 1t speedup/FR"] == pytest.approx(r["CPU bs1 ort 1t speedup"] / r["FR"])
    assert torch.get_num_threads() == threads
    line = summary(r)
    assert line.startswith("CPU bs1 ort 1t: dense ") and line.endswith(f"x FR {r['FR']:.2f}x)")
    assert f"speedup {r['CPU bs1 ort 1t speedup']:.2f}x ({r['CPU bs1 ort 1t speedup/FR']:.2f} x FR" in line


def _nchwc_nodes(data, sess, tmp_path):
    """Nodes in ONNX Runtime's blocked-layout domain once ``sess``'s own options have optimised the
    graph ``data`` (written out by a second session with the same options)."""
    import onnx
    import onnxruntime as ort
    opts = sess.get_session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sum(n.domain == "com.microsoft.nchwc" for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the NCHWc layout is an x86 (AVX2/AVX-512) path")
def test_optimisation_levels_compute_the_same_logits_and_only_all_is_blocked(pruned_resnet56, tmp_path):
    data = serving.to_onnx(pruned_resnet56)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pruned_resnet56.eval()(x)
    blocked = {}
    for level in serving.OPTIMIZATIONS:
        sess = serving.session(data, threads=1, optimization=level)
        assert torch.allclose(serving.run(sess, x), want, atol=1e-4, rtol=0)
        blocked[level] = _nchwc_nodes(data, sess, tmp_path)
    # At "all" the convs run blocked, CUP's odd widths padded up to the block (the cost that rounds pruning away).
    assert blocked["basic"] == blocked["extended"] == 0 < blocked["all"]
    with pytest.raises(ValueError, match="optimization must be one of"):
        serving.session(data, optimization="max")


def test_latency_comparison_names_a_lower_optimisation_level(pruned_mlp):
    r = compare(pruned_mlp, cpu_reps=3, rounds=1, cpu_threads=1, runtime="onnxruntime", ort_optimization="extended")
    assert [k for k in r if k.startswith("CPU")] == [f"CPU bs1 ort extended 1t {s}" for s in
                                                     ("dense ms", "pruned ms", "speedup", "speedup/FR")]


def test_export_command_writes_a_checked_onnx_file_and_refuses_a_bad_one(pruned_mlp, tmp_path, capsys):
    etm = tmp_path / "C1.etm"
    save_compressed(pruned_mlp, etm)
    assert main(["export", str(etm), str(tmp_path / "C1.onnx")]) == 0
    size = (tmp_path / "C1.onnx").stat().st_size
    assert f"{size:,} bytes" in capsys.readouterr().out
    etm.write_bytes(etm.read_bytes()[:100])                            # truncated
    assert main(["export", str(etm), str(tmp_path / "bad.onnx")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()
