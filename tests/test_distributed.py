"""Data-parallel ``fit`` on 2 CPU processes (gloo), against one process with the same global batch.

The two-rank run is scripts/ddp_proof.py's worker (the same code the 2-GPU proof runs), started
with torch.multiprocessing on a free port. The single process runs with ``bn_splits=2`` so its
BatchNorm normalises each half of the batch on its own, as each rank does; both then compute the
same function and their per-step losses agree to rounding. CUP-SS prunes at the start of epoch 2.
"""
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from elastictrain import distributed
from elastictrain.imagenet import make_synthetic_imagefolder
from elastictrain.models import create_model
from elastictrain.train import TrainConfig, _split_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ddp_proof  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun does; the single process below uses one thread too


def _rank(rank, cfg, port):
    """One spawned rank: the helper checks, then the proof's training run."""
    _join(rank, cfg.ranks, port)
    device = distributed.init_distributed("cpu")
    record = {"device": str(device), "rank": distributed.rank(), "world": distributed.world_size(),
              "main": distributed.is_main(), "sum": distributed.all_reduce_sum([rank + 1, 0.5])}
    torch.manual_seed(rank)  # different weights on each rank
    model = create_model("mlp", hidden=(8, 4)).requires_grad_(False)
    distributed.sync_model(model, rebuilt=False)  # nothing rebuilt: weights stay each rank's own
    record["kept_own"] = model.fc1.weight[0, 0].item()
    distributed.sync_model(model, rebuilt=rank == 1)  # one rank rebuilt: every rank takes rank 0's
    record["after"] = model.fc1.weight[0, 0].item()
    try:
        distributed.sync_model(create_model("mlp", hidden=(8, 4 + rank)), rebuilt=False)
    except RuntimeError as e:
        record["error"] = str(e)
    Path(cfg.out, f"helpers{rank}.json").write_text(json.dumps(record))
    ddp_proof.worker(cfg)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The proof's config and folder after 2 spawned gloo ranks ran; spawning costs ~5 s a process."""
    out = tmp_path_factory.mktemp("ddp")
    data = make_synthetic_imagefolder(out / "data", classes=4, per_class=16, size=40)
    cfg = ddp_proof.ProofConfig(str(data), str(out), ranks=2, epochs=3, batch=16, image_size=32, cpu=True,
                                workers=0)
    mp.spawn(_rank, args=(cfg, free_port()), nprocs=2, join=True)
    return cfg, out


@pytest.fixture
def one_thread_deterministic():
    """The proof's worker sets process-wide flags meant for its own process: restore them."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])
    torch.backends.cudnn.deterministic = saved[2]


def test_two_ranks_match_one_process_through_a_cup_ss_pruning_event(two_ranks, one_thread_deterministic):
    cfg, out = two_ranks
    single = ddp_proof.worker(cfg)  # no process group here: one process, global batch 16, bn_splits=2
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    result = ddp_proof.compare(single, ranks, 1e-4, out)
    assert (result["steps"], result["steps_ddp"]) == (12, 12)          # 64 images / 16 per global batch × 3
    assert result["max_rel_loss_diff"] < 1e-4, single["losses"][:4] + ranks[0]["losses"][:4]
    assert result["pruned_at_epoch"] == 2 and result["architecture_changed_mid_run"]
    assert result["archs_identical_across_ranks"] and result["weights_identical_across_ranks"]
    assert result["eval_identical_across_ranks"] and result["loss_logged_identically_on_ranks"]
    assert result["arch_matches_single_process"] and result["max_abs_weight_diff"] < 1e-5
    assert result["passed"]
    # the loss curve is a training curve, not a constant: it moved by more than the tolerance
    assert max(single["losses"]) - min(single["losses"]) > 0.05


def test_rank_helpers_broadcast_rank0_and_reject_different_architectures(two_ranks):
    _, out = two_ranks
    r0, r1 = (json.loads((out / f"helpers{r}.json").read_text()) for r in range(2))
    assert (r0["rank"], r1["rank"], r0["world"], r0["main"], r1["main"]) == (0, 1, 2, True, False)
    assert r0["sum"] == r1["sum"] == [3.0, 1.0] and r0["device"] == "cpu"
    assert r0["kept_own"] != r1["kept_own"]
    assert r0["after"] == r1["after"] == r0["kept_own"]
    for r in (r0, r1):
        assert "ranks disagree on the architecture" in r["error"]
        assert '"hidden": [8, 4]' in r["error"] and '"hidden": [8, 5]' in r["error"]


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_sum([2, 3.5]) == [2, 3.5]
    distributed.barrier()


def test_split_forward_normalises_each_part_and_keeps_the_first_parts_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    x = torch.randn(8, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5
    out = _split_forward(bn, bn, x, 2)
    expected = torch.cat([nn.functional.batch_norm(p, None, None, training=True) for p in x.chunk(2)])
    assert torch.allclose(out, expected, atol=1e-6)
    alone = nn.BatchNorm1d(3)
    alone(x[:4])
    assert torch.allclose(bn.running_mean, alone.running_mean) and torch.allclose(bn.running_var, alone.running_var)
    assert bn.momentum == 0.1  # restored
    with pytest.raises(ValueError, match="split evenly"):
        _split_forward(bn, bn, x[:7], 2)
    with pytest.raises(ValueError, match="bn_splits"):
        TrainConfig(bn_splits=2, adversarial_beta=0.5)
