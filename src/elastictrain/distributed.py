"""Multi-GPU data parallelism for ``train.fit`` (one process per GPU, launched by torchrun).

``fit`` keeps one training loop: when a process group is initialised it wraps the training forward
in DistributedDataParallel and calls the helpers below at the few points where ranks must agree
(a model a callback rebuilt, BatchNorm buffers, epoch metrics, evaluation counts, checkpoints).
Without a process group every helper is a no-op, so single-process code never pays for them.
"""
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def init_distributed(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    and return this process's device: ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo
    (``device="cpu"`` forces the CPU). Without torchrun, or with WORLD_SIZE 1, nothing is
    initialised and the single process uses the first GPU (or the CPU)."""
    # NVLink multicast stays off unless the caller's environment says otherwise: on a shared host a
    # job using it can take the GPUs out of service for others, and plain ring/tree all-reduce is
    # all that ResNet gradients need.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cpu" or not torch.cuda.is_available():
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo works on the CPU.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    if is_distributed():
        if dist.get_backend() == "nccl":  # naming the device avoids NCCL guessing (and warning)
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64, so counts stay exact); the values as they are alone."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def ddp(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel: gradients averaged over ranks in backward, and rank 0's
    buffers (BatchNorm running statistics) broadcast before every forward."""
    dev = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def broadcast_state(model: nn.Module, buffers_only: bool = False):
    """Overwrite every rank's parameters and buffers (or buffers only) with rank 0's, in place."""
    if not is_distributed():
        return
    tensors = list(model.buffers()) if buffers_only else list(model.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


def sync_model(model: nn.Module, rebuilt: bool):
    """Called by ``fit`` after the epoch's callbacks ran on every rank: the ranks must hold the same
    architecture (CUP-SS prunes on each rank from identical weights; a mismatch means a
    nondeterministic callback), and a rebuilt model gets rank 0's weights so they are identical."""
    if not is_distributed():
        return
    views = [None] * world_size()
    dist.all_gather_object(views, (json.dumps(getattr(model, "arch", None), sort_keys=True), rebuilt))
    if len({arch for arch, _ in views}) > 1:
        raise RuntimeError("ranks disagree on the architecture after the epoch's callbacks: "
                           + "; ".join(f"rank {r}: {arch}" for r, (arch, _) in enumerate(views)))
    if any(flag for _, flag in views):
        broadcast_state(model)
