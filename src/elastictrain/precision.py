"""The one mixed-precision policy: bf16 autocast on CUDA, float32 elsewhere.

Training, evaluation, the attacks and the CUDA-graph capture (``graphs``) all take their context from
here, so a change of policy is one edit.
"""
import torch


def autocast(device, enabled: bool = True, cache: bool = True):
    """bf16 autocast on CUDA when ``enabled``; on the CPU bf16 is slower than float32, and smoke runs
    need no speed. ``cache=False`` is for CUDA-graph capture, where casts must not be cached across
    calls (torch's CUDA-graph documentation)."""
    device = torch.device(device)
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast(device.type, enabled=False)
