"""Where rewiring's per-step cost goes: torch.profiler over one compiled VGG16 epoch (batch 512, synthetic
CIFAR-shaped data, unstructured masks at density 0.002 in the second epoch of a 4-epoch ramp), without and
with rewiring (0.3), printing the top operations by GPU time and by CPU time and the epoch times (the
profiled epoch is the second). One H100: ~75 s. Results: docs/reproduction_log.md (mask cost paragraph).

    python benchmarks/rewire_profile.py
"""
import torch
from torch.profiler import ProfilerActivity, profile
from elastictrain.data import GpuLoader, Split
from elastictrain.models import create_model
from elastictrain.prune import MaskCallback, PruneSpec
from elastictrain.train import Callback, TrainConfig, fit

g = torch.Generator().manual_seed(0)
split = Split(torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g),
              torch.randint(0, 10, (50000,), generator=g), "syn")


class Prof(Callback):
    def before_epoch(self, state):
        if state.epoch == 1:
            self.p = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.p.__enter__()

    def after_epoch(self, state):
        if state.epoch == 2:
            self.p.__exit__(None, None, None)
            ka = self.p.key_averages()
            print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
            print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


for rewire in (0.0, 0.3):
    loader = GpuLoader(split, 512, train=True, crop_pad=4, flip=True, device="cuda")
    cfg = TrainConfig(epochs=2, lr=0.05, eval_every=0, compile="reduce-overhead")
    _, h = fit(create_model("vgg16"), loader, None, cfg, device="cuda", progress=False,
               callbacks=[MaskCallback(PruneSpec(), 0.002, ramp_epochs=4, rewire=rewire), Prof()])
    print("REWIRE", rewire, "epoch times", h["epoch_time_s"].round(3).tolist(), flush=True)
