"""ElasticTrain checkpoint layout: export and import are exact, masks mean what ModelEval reads."""
import os

import pytest
import torch

from elastictrain.checkpoints import CheckpointError
from elastictrain.compat import MASKS, export_elastictrain, import_elastictrain, modeleval_counts
from elastictrain.metrics import count_weights
from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights


@pytest.fixture(scope="module")
def sparse_vgg():
    torch.manual_seed(0)
    m = create_model("vgg16")
    with torch.no_grad():
        for n, w in prunable_weights(m).items():
            if w.dim() == 4:  # whole kernels off in half the kernels, then single weights in the rest
                w.mul_((torch.rand(w.shape[:2]) < 0.5)[:, :, None, None])
            w.mul_(torch.rand(w.shape) < 0.3)
        for mod in m.modules():  # non-trivial BN statistics so that they must travel too
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2)
    return m.eval()


def test_layout_and_round_trip(sparse_vgg, tmp_path):
    p = export_elastictrain(sparse_vgg, tmp_path / "et.pt", epoch=123)
    ckpt = torch.load(p, weights_only=True)
    assert set(ckpt) == {"model_state_dict", "elastic_trainer_state_dict", "local_dict"}
    assert ckpt["local_dict"]["epoch"] == 123
    assert not any(k.startswith("normalize.") for k in ckpt["model_state_dict"])  # normalised outside
    assert "features.40.weight" in ckpt["model_state_dict"] and "classifier.weight" in ckpt["model_state_dict"]
    buffers = ckpt["elastic_trainer_state_dict"]["model_buffers_state_dict"]
    assert set(buffers) == set(MASKS) | {"quantization_table"} and buffers["quantization_table"] == {}
    weights = prunable_weights(sparse_vgg)
    for name in MASKS:
        assert set(buffers[name]) == set(weights)
    for n, w in weights.items():
        em, sm = buffers["weight_mask"][n], buffers["structured_weight_mask"][n]
        assert em.dtype == torch.float32 and em.shape == w.shape
        assert torch.equal(em, (w != 0).float())
        if w.dim() == 4:  # structure-level mask: whole kernels, 1 wherever the kernel holds a non-zero
            assert torch.equal(sm, (w != 0).flatten(2).any(2).float()[:, :, None, None].expand_as(w))
    model, _ = import_elastictrain(p)
    for (k, a), (k2, b) in zip(sparse_vgg.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sparse_vgg(x), model(x))


def test_modeleval_counts_match_ours(sparse_vgg, tmp_path):
    p = export_elastictrain(sparse_vgg, tmp_path / "et.pt")
    total, nonzero = modeleval_counts(torch.load(p, weights_only=True)["model_state_dict"])
    assert total == 14_715_584
    assert (total, nonzero) == count_weights(sparse_vgg)


def test_quantization_table_travels(sparse_vgg, tmp_path):
    table = {"features.0.weight": torch.linspace(-1, 1, 16).reshape(1, 16)}
    p = export_elastictrain(sparse_vgg, tmp_path / "q.pt", quantization_table=table)
    _, buffers = import_elastictrain(p)
    assert torch.equal(buffers["quantization_table"]["features.0.weight"], table["features.0.weight"])


def test_export_refuses_other_architectures(tmp_path):
    with pytest.raises(ValueError, match="full-width VGG16"):
        export_elastictrain(create_model("resnet56"), tmp_path / "r.pt")
    with pytest.raises(ValueError, match="full-width VGG16"):
        export_elastictrain(create_model("vgg16", widths=[32] * 13), tmp_path / "v.pt")
    assert not os.listdir(tmp_path)


def test_import_refusals(sparse_vgg, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        import_elastictrain(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "ours.pt")
    with pytest.raises(CheckpointError, match="model_state_dict"):
        import_elastictrain(tmp_path / "ours.pt")
    torch.save({"model_state_dict": create_model("resnet56").state_dict()}, tmp_path / "r56.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        import_elastictrain(tmp_path / "r56.pt")
    p = export_elastictrain(sparse_vgg, tmp_path / "bad.pt")
    ckpt = torch.load(p, weights_only=True)
    ckpt["elastic_trainer_state_dict"]["model_buffers_state_dict"]["weight_mask"]["features.3.weight"].zero_()
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="inconsistent"):
        import_elastictrain(tmp_path / "bad.pt")
    data = (tmp_path / "ours.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        import_elastictrain(tmp_path / "cut.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/elastictrain-pwned-compat",))


def test_import_never_unpickles_code(tmp_path):
    torch.save({"model_state_dict": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        import_elastictrain(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/elastictrain-pwned-compat")
