"""Training throughput: a plain torchvision DataLoader loop vs our trainer, same GPU, same run.

(a) torchvision CIFAR10 + RandomCrop/Flip/ToTensor, DataLoader(batch 128, 4 workers, pinned),
    fp32, NCHW, SGD — the loop most CIFAR repositories use;
(b) elastictrain.train.fit: data resident on the GPU, crop/flip on the GPU, bf16 autocast,
    channels_last, batch 512.
Both time one full epoch over the 50k training images after a warm-up epoch (cuDNN autotuning
and worker start-up excluded), and report images/s. Measured: see README (GPU kind stated there).

    python benchmarks/train_throughput.py [--model vgg16] [--synthetic] [--mask-density 0.02] [--rewire 0.3] [--repeats 3]
        [--deferred] [--sam 0.05]

With --deferred every epoch trains a new model object with compiling deferred, as CUP-SS's pruning
epochs do (a copy here, so the shapes stay put and only the trainer's path differs): compile 'none' is
the eager loop, 'reduce-overhead' captures each epoch's CUDA graph (graphs.GraphedForward), and the
timed epoch includes that capture.

With --repeats N the trainer configurations of one model, batch and compile mode are timed N times each, round-robin,
and each is reported as its median with every run listed: a single run favoured whichever configuration ran later
(session 7: the unmasked fit, run first, came out 10% slower than the masked one).

With --sam RHO the same configuration is also timed with sharpness-aware minimisation (a second forward
and backward per step, ``elastictrain.sam``): SAM should cost about 2x a step. CUP-SS on ResNet-56 ran
3.5-5x slower per epoch with it (sessions 54-55, cup_variants.md), which this isolates from the data.

--synthetic replaces CIFAR-10 by random uint8 images of the same shape (timing does not depend on
pixel values); it skips (a), which needs the real files.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from elastictrain.data import GpuLoader, Split, data_root, load_split
from elastictrain.models import create_model
from elastictrain.prune import MaskCallback, PruneSpec
from elastictrain.train import Callback, TrainConfig, fit


class NewModelEachEpoch(Callback):
    """What CUP-SS does to the trainer before each pruning epoch, minus the pruning."""

    def before_epoch(self, state):
        state.model = copy.deepcopy(state.model)
        state.rebuild_optimizer()
        state.defer_compile = True


def dataloader_images_per_s(model_name, root, batch=128, workers=4):
    import torchvision
    import torchvision.transforms as T
    ds = torchvision.datasets.CIFAR10(str(root), train=True, download=True,
                                      transform=T.Compose([T.RandomCrop(32, 4), T.RandomHorizontalFlip(), T.ToTensor()]))
    loader = torch.utils.data.DataLoader(ds, batch, shuffle=True, num_workers=workers, pin_memory=True,
                                         drop_last=True, persistent_workers=True)
    model = create_model(model_name).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    times = []
    for _ in range(2):  # the first epoch warms up cuDNN and the workers
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n / times[-1]


def trainer_images_per_s(model_name, split, batch=512, compile=None, mask_density=None, ramp=1, rewire=0.0,
                         deferred=False, sam_rho=0.0):
    loader = GpuLoader(split, batch, train=True, crop_pad=4, flip=True, device="cuda")
    cfg = TrainConfig(epochs=2, lr=0.05, eval_every=0, compile=compile, sam_rho=sam_rho)
    # Masks change only before an epoch, outside its timing, so epoch 2 times their enforcement after
    # every step: the cost that must stay under ~10% of a step. With a 4-epoch ramp and rewiring, epoch 2
    # also keeps the running average of the dense gradient that the next update regrows by.
    callbacks = [MaskCallback(PruneSpec(), mask_density, ramp_epochs=ramp, rewire=rewire)] if mask_density else []
    callbacks += [NewModelEachEpoch()] if deferred else []
    _, hist = fit(create_model(model_name), loader, None, cfg, callbacks=callbacks, device="cuda", progress=False)
    return len(loader) * batch / hist["epoch_time_s"].iloc[-1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=["vgg16"], nargs="+")
    p.add_argument("--batch", type=int, default=[512], nargs="+", help="batch sizes for our trainer")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--compile", nargs="+", default=[None], type=lambda s: None if s == "none" else s,
                   help="torch.compile modes to time for our trainer ('none' = eager)")
    p.add_argument("--mask-density", type=float, default=None,
                   help="also time our trainer with unstructured masks at this density enforced every step")
    p.add_argument("--rewire", type=float, default=0.0,
                   help="with --mask-density: also time a rewiring ramp (gradient average every step) against the same ramp without")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each trainer configuration this many times, round-robin, and report the median")
    p.add_argument("--deferred", action="store_true",
                   help="a new model every epoch, compiling deferred (CUP-SS's pruning epochs); see above")
    p.add_argument("--sam", type=float, default=0.0, help="also time the same configuration with SAM at this radius")
    args = p.parse_args()
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        split = Split(torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (50000,), generator=g), "synthetic")
    else:
        split = load_split("cifar10", train=True)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    configs = {"dense": dict(deferred=args.deferred)}
    if args.sam:
        configs["sam"] = dict(deferred=args.deferred, sam_rho=args.sam)
    if args.mask_density:
        configs["masked"] = dict(mask_density=args.mask_density)
        if args.rewire:
            configs["ramp"] = dict(mask_density=args.mask_density, ramp=4)
            configs["rewired"] = dict(mask_density=args.mask_density, ramp=4, rewire=args.rewire)
    for name in args.model:
        base = None
        if not args.synthetic:
            base = dataloader_images_per_s(name, root=data_root())
            print(f"{name}: (a) DataLoader bs128 fp32 4 workers: {base:,.0f} images/s")
        for mode in args.compile:
            for b in args.batch:
                runs = {key: [] for key in configs}
                for _ in range(args.repeats):  # round-robin, so warm-up and clock drift hit every configuration
                    for key, kw in configs.items():
                        runs[key].append(trainer_images_per_s(name, split, b, mode, **kw))
                ips = {key: statistics.median(v) for key, v in runs.items()}
                each = {key: f" [{key} runs: " + ", ".join(f"{x:,.0f}" for x in v) + "]" if len(v) > 1 else ""
                        for key, v in runs.items()}
                ratio = f", {ips['dense'] / base:.1f}x (a)" if base else ""
                print(f"{name}: (b) elastictrain fit bs{b} bf16 channels_last compile={mode}"
                      f"{' deferred (new model each epoch)' if args.deferred else ''}: "
                      f"{ips['dense']:,.0f} images/s{ratio}{each['dense']}", flush=True)
                if "sam" in ips:
                    print(f"{name}:     with SAM rho {args.sam}: {ips['sam']:,.0f} images/s, "
                          f"step {ips['dense'] / ips['sam']:.2f}x the step without{each['sam']}", flush=True)
                if "masked" in ips:
                    print(f"{name}:     with masks at density {args.mask_density}: {ips['masked']:,.0f} images/s, "
                          f"step {100 * (ips['dense'] / ips['masked'] - 1):+.1f}% vs unmasked{each['masked']}", flush=True)
                if "rewired" in ips:
                    print(f"{name}:     mid-ramp, rewiring {args.rewire}: {ips['rewired']:,.0f} images/s vs "
                          f"{ips['ramp']:,.0f} without, step {100 * (ips['ramp'] / ips['rewired'] - 1):+.1f}%"
                          f"{each['rewired']}{each['ramp']}", flush=True)


if __name__ == "__main__":
    main()
