"""Tests for elastictrain.storage: bit packing, Rice-coded positions and the .etm model file."""
import numpy as np
import pytest
import torch

from elastictrain.metrics import count_weights, dense_fp32_bytes
from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights
from elastictrain.storage import (MAGIC, StorageError, byte_report, decode_positions, encode_positions,
                                  load_compressed, pack_bits, pack_varbits, read_header, save_compressed,
                                  tensor_bytes, unpack_bits, unpack_varbits)


# ------------------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("nbits", range(1, 21))
def test_pack_unpack_round_trip(nbits):
    rng = np.random.default_rng(nbits)
    values = rng.integers(0, 2 ** nbits, size=1001, dtype=np.int64)
    values[0], values[-1] = 0, 2 ** nbits - 1  # both extremes
    packed = pack_bits(values, nbits)
    assert len(packed) == -(-1001 * nbits // 8)
    out = unpack_bits(packed, nbits, len(values))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, values)


def test_pack_bits_is_msb_first():
    assert pack_bits(np.array([1, 2, 3]), 2) == bytes([0b01101100])
    assert pack_bits(np.array([5]), 3) == bytes([0b10100000])
    np.testing.assert_array_equal(unpack_bits(bytes([0b01101100]), 2, 3), [1, 2, 3])


@pytest.mark.parametrize("nbits", [1, 4, 7, 20])
def test_pack_bits_refuses_a_value_that_does_not_fit(nbits):
    with pytest.raises(ValueError, match=f"{nbits} bits"):
        pack_bits(np.array([0, 2 ** nbits]), nbits)


def test_pack_bits_empty_and_zero_width():
    assert pack_bits(np.array([], dtype=np.int64), 5) == b""
    assert pack_bits(np.array([0, 0, 0]), 0) == b""
    np.testing.assert_array_equal(unpack_bits(b"", 0, 4), np.zeros(4, dtype=np.int64))
    assert len(unpack_bits(b"", 7, 0)) == 0


def test_varbits_round_trip_and_size():
    rng = np.random.default_rng(5)
    widths = rng.integers(0, 9, size=777)
    values = np.array([rng.integers(0, 2 ** w) if w else 0 for w in widths])
    packed = pack_varbits(values, widths)
    assert len(packed) == -(-int(widths.sum()) // 8)
    np.testing.assert_array_equal(unpack_varbits(packed, widths), values)
    assert pack_varbits(np.array([3, 0, 1]), np.array([2, 0, 1])) == bytes([0b11100000])
    assert pack_varbits(np.array([0, 0]), np.array([0, 0])) == b""
    with pytest.raises(ValueError, match="does not fit"):
        pack_varbits(np.array([2]), np.array([1]))


# ------------------------------------------------------------------------------------- positions

def _round_trip(pos):
    pos = np.asarray(pos, dtype=np.int64)
    info, unary, rem = encode_positions(pos)
    out = decode_positions(info, unary, rem, len(pos))
    np.testing.assert_array_equal(out, pos)
    return info, unary, rem


@pytest.mark.parametrize("seed,n,universe", [(0, 10, 100), (1, 1000, 10_000), (2, 5000, 2_000_000),
                                             (3, 300, 301), (4, 1, 50)])
def test_positions_round_trip_random(seed, n, universe):
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(universe, size=n, replace=False))
    _round_trip(pos)


@pytest.mark.parametrize("pos", [
    [],                                   # empty
    [0],                                  # position 0 alone
    [0, 1, 2, 3, 4, 5],                   # consecutive from 0 (every gap 0)
    list(range(1000, 1064)),              # consecutive run after a gap
    [0, 2_359_295],                       # one huge gap (a whole VGG16 layer)
    [5, 6, 7, 3_000_000, 3_000_001],      # small gaps around a huge one
    [2 ** 31 + 7],                        # beyond 32-bit
], ids=["empty", "zero", "consecutive", "run", "huge_gap", "mixed", "beyond_int32"])
def test_positions_round_trip_edge_cases(pos):
    info, unary, rem = _round_trip(pos)
    if not pos:
        assert (info["unary_bits"], unary, rem) == (0, b"", b"")


def test_positions_cost_about_log2_inverse_density():
    rng = np.random.default_rng(0)
    universe, n = 1_000_000, 10_000  # density 1 %
    pos = np.sort(rng.choice(universe, size=n, replace=False))
    info, unary, rem = _round_trip(pos)
    bits_per_nz = 8 * (len(unary) + len(rem)) / n
    assert 6.0 < bits_per_nz < np.log2(universe / n) + 2.5
    assert info["k"] in (5, 6, 7)


def test_decode_positions_rejects_wrong_count():
    info, unary, rem = encode_positions(np.array([1, 5, 9]))
    with pytest.raises(StorageError, match="holds 3 entries, header says 4"):
        decode_positions(info, unary, rem, 4)


# ---------------------------------------------------------------------------------- model files

def magnitude_prune(model, keep=0.02):
    """Zero all but the largest ``keep`` fraction of every conv/linear weight, by magnitude."""
    with torch.no_grad():
        for w in prunable_weights(model).values():
            k = max(1, int(keep * w.numel()))
            thresh = w.abs().flatten().kthvalue(w.numel() - k).values
            w[w.abs() <= thresh] = 0
    return model


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics and affine params, so a decoding mix-up cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(123)
    return model


def assert_same_state(a, b):
    sa = {k: v for k, v in a.state_dict().items() if not k.endswith("num_batches_tracked")}
    sb = {k: v for k, v in b.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def assert_loaded_model_behaves(orig, loaded, input_shape):
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert all(b.device.type == "cpu" for b in loaded.buffers())
    orig.eval()
    x = torch.rand(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), orig(x))


@pytest.fixture(scope="module")
def sparse_vgg(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise_bn(magnitude_prune(create_model("vgg16")))
    path = tmp_path_factory.mktemp("etm") / "sparse_vgg.etm"
    size = save_compressed(model, path, meta={"row": "E1", "accuracy": 93.1, "bits": 32,
                                              "notes": ["a", 1, None], "nested": {"t": 0.9}})
    return model, path, size


def test_sparse_vgg16_round_trip_is_bit_exact(sparse_vgg):
    model, path, size = sparse_vgg
    total, nonzero = count_weights(model)
    assert total == 14_715_584
    assert 0.0199 * total < nonzero <= 0.0201 * total
    loaded = load_compressed(path)
    assert loaded.arch == {"name": "vgg16", "kwargs": {}}
    assert_same_state(model, loaded)
    assert count_weights(loaded) == (total, nonzero)
    assert_loaded_model_behaves(model, loaded, (2, 3, 32, 32))


def test_sparse_vgg16_file_size_and_byte_report(sparse_vgg):
    model, path, size = sparse_vgg
    assert path.stat().st_size == size
    assert size < dense_fp32_bytes(model) / 30
    rep = byte_report(path)
    assert rep["total"] == size
    parts = {k: v for k, v in rep.items() if k != "total"}
    assert sum(parts.values()) == size
    assert set(parts) == {"header", "index", "values", "codebooks", "weights", "params"}
    # every prunable weight is sparse: 4 bytes per non-zero value, no dense weight section
    assert rep["values"] == 4 * count_weights(model)[1]
    assert rep["weights"] == 0
    # fp32 BN affine + running stats (4 * 4224) and Normalize mean/std (6); the conv and classifier
    # biases are still all zero (their init), which the sparse encoding stores in 0 bytes;
    # num_batches_tracked is not stored
    assert rep["params"] == 4 * (4 * 4224 + 6)
    assert rep["index"] < rep["values"]
    header = read_header(path)
    sparse = {t["name"] for t in header["tensors"] if t["enc"] == "sparse"}
    weights = set(prunable_weights(model))
    assert weights <= sparse and len(sparse - weights) == 14 and all(n.endswith(".bias") for n in sparse - weights)


def test_meta_round_trips(sparse_vgg):
    _, path, _ = sparse_vgg
    loaded = load_compressed(path)
    assert loaded.meta == {"row": "E1", "accuracy": 93.1, "bits": 32, "notes": ["a", 1, None],
                           "nested": {"t": 0.9}}
    assert read_header(path)["meta"] == loaded.meta


def test_dense_resnet56_with_pruned_widths(tmp_path):
    torch.manual_seed(1)
    model = randomise_bn(create_model("resnet56", widths=[8] * 27))
    path = tmp_path / "r56.etm"
    size = save_compressed(model, path)
    loaded = load_compressed(path)
    assert loaded.arch == {"name": "resnet56", "kwargs": {"widths": [8] * 27}}
    assert [b.conv1.out_channels for s in (loaded.layer1, loaded.layer2, loaded.layer3) for b in s] == [8] * 27
    assert_same_state(model, loaded)
    assert_loaded_model_behaves(model, loaded, (2, 3, 32, 32))
    assert loaded.meta == {}
    rep = byte_report(path)
    assert sum(v for k, v in rep.items() if k != "total") == size == path.stat().st_size
    assert rep["index"] == rep["values"] == 0  # dense weights are not worth gap coding
    n_weights = count_weights(model)[0]
    assert rep["weights"] == 4 * n_weights
    n_params = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert rep["weights"] + rep["params"] == 4 * n_params


def test_mlp_round_trip(tmp_path):
    torch.manual_seed(2)
    model = create_model("mlp", hidden=(100, 60))
    with torch.no_grad():
        model.fc1.weight[:, :300] = 0  # a partly sparse layer beside dense ones
    path = tmp_path / "mlp.etm"
    save_compressed(model, path, meta={"dataset": "mnist"})
    loaded = load_compressed(path)
    assert loaded.arch == {"name": "mlp", "kwargs": {"hidden": [100, 60]}}
    assert (loaded.fc1.out_features, loaded.fc2.out_features) == (100, 60)
    assert_same_state(model, loaded)
    assert_loaded_model_behaves(model, loaded, (3, 1, 28, 28))
    assert loaded.meta == {"dataset": "mnist"}


def test_save_needs_arch(tmp_path):
    with pytest.raises(ValueError, match="no .arch"):
        save_compressed(torch.nn.Linear(2, 2), tmp_path / "x.etm")
    assert not (tmp_path / "x.etm").exists()


# ------------------------------------------------------------------------------------ bad files

@pytest.fixture
def small_file(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "good.etm"
    save_compressed(create_model("mlp", hidden=(40, 20)), path)
    return path


def _refused(path, *words):
    with pytest.raises(StorageError) as exc:
        load_compressed(path)
    msg = str(exc.value)
    assert str(path) in msg
    for w in words:
        assert w in msg
    return msg


def test_good_file_loads(small_file):
    assert small_file.read_bytes()[:4] == MAGIC
    load_compressed(small_file)  # the fixture itself is fine; the variants below are not


def test_refuses_torch_save_file(tmp_path):
    path = tmp_path / "ckpt.etm"
    torch.save({"state_dict": create_model("mlp", hidden=(4, 4)).state_dict()}, path)
    _refused(path, "not an ElasticTrain compact model")


def test_refuses_truncated_file(small_file, tmp_path):
    data = small_file.read_bytes()
    path = tmp_path / "half.etm"
    path.write_bytes(data[:len(data) // 2])
    _refused(path, "truncated or corrupted")
    tiny = tmp_path / "tiny.etm"
    tiny.write_bytes(data[:6])
    _refused(tiny, "not an ElasticTrain")


def test_refuses_corrupted_payload(small_file, tmp_path):
    data = bytearray(small_file.read_bytes())
    data[-10] ^= 0xFF
    path = tmp_path / "flipped_payload.etm"
    path.write_bytes(bytes(data))
    _refused(path, "payload is truncated or corrupted")


def test_refuses_corrupted_header(small_file, tmp_path):
    data = bytearray(small_file.read_bytes())
    data[9] ^= 0xFF  # first byte after the 9-byte prefix: the zlib stream of the header
    path = tmp_path / "flipped_header.etm"
    path.write_bytes(bytes(data))
    _refused(path, "header is truncated or corrupted")


def test_refuses_other_version(small_file, tmp_path):
    data = bytearray(small_file.read_bytes())
    data[4] = 9
    path = tmp_path / "v9.etm"
    path.write_bytes(bytes(data))
    _refused(path, "format version 9")


def test_refuses_missing_file(tmp_path):
    path = tmp_path / "nope.etm"
    _refused(path, "no such model file")
    with pytest.raises(StorageError, match="no such model file"):
        byte_report(path)


# ------------------------------------------------------------------ cheapest exact parameter forms

def test_parameters_take_the_cheapest_exact_encoding(tmp_path):
    """Constant, fp16-exact and mostly-zero parameter vectors cost 4 bytes, 2 bytes per value and
    (positions + 2 bytes per non-zero); arbitrary fp32 ones stay at 4 bytes per value; all bit-exact."""
    torch.manual_seed(4)
    model = randomise_bn(create_model("vgg16", widths=[16] * 13))
    bn, conv = model.features[1], model.features[0]
    with torch.no_grad():
        bn.running_var.fill_(0.75)                                  # const
        bn.weight.copy_(torch.randn(16).half().float())            # fp16-exact, dense
        bn.bias.zero_()
        bn.bias[[2, 9]] = torch.tensor([0.5, -1.25])               # 2 of 16 non-zero, fp16-exact
        conv.bias.copy_(torch.randn(16))                           # arbitrary fp32
        model.features[4].weight[3] = -0.0                         # a negative zero must survive
    path = tmp_path / "p.etm"
    size = save_compressed(model, path)
    back = load_compressed(path)
    assert_same_state(model, back)
    assert torch.equal(back.features[4].weight.view(torch.int32), model.features[4].weight.view(torch.int32))
    rows = {r["tensor"]: r for r in tensor_bytes(path)}
    assert (rows["features.1.running_var"]["enc"], rows["features.1.running_var"]["bytes"]) == ("const", 4)
    assert (rows["features.1.weight"]["enc"], rows["features.1.weight"]["dtype"], rows["features.1.weight"]["bytes"]) == \
        ("dense", "f2", 32)
    assert rows["features.1.bias"]["enc"] == "sparse" and rows["features.1.bias"]["dtype"] == "f2"
    assert rows["features.1.bias"]["bytes"] <= 2 * 2 + 4                 # two fp16 values + a few index bytes
    assert (rows["features.0.bias"]["enc"], rows["features.0.bias"]["bytes"]) == ("dense", 64)
    assert (rows["features.4.weight"]["enc"], rows["features.4.weight"]["dtype"]) == ("dense", "f4")
    assert byte_report(path)["header"] + sum(r["bytes"] for r in rows.values()) == size == path.stat().st_size


def test_version_1_files_still_load(tmp_path, sparse_vgg):
    """The first shipped models (TrainedModels/E1, E3, C1) are version-1 files: same layout with
    fp32 everywhere and no ``vdtype``; rewriting the version byte of a file that uses only those
    encodings gives exactly such a file."""
    model, path, _ = sparse_vgg
    data = bytearray(path.read_bytes())
    assert data[4] == 2
    encs = {t["enc"] for t in read_header(path)["tensors"]}
    assert encs <= {"dense", "sparse"} and all("vdtype" not in t for t in read_header(path)["tensors"]
                                               if t["enc"] == "dense" or t["nnz"] > 0)
    data[4] = 1
    old = tmp_path / "v1.etm"
    old.write_bytes(bytes(data))
    assert_same_state(model, load_compressed(old))
