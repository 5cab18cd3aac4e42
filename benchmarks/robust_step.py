"""Adversarial training speed: eager against compiled ("reduce-overhead", CUDA graphs), same GPU, same run.

An adversarial VGG16 step is 7 PGD forward/backward passes plus one training step on the clean and
adversarial batch together (spec §5.9), so PGD sets the pace. Eager VGG16 at 32x32 is bound by kernel
launches; TrainConfig.compile compiles both the training forward and the attack's own copy
(eval mode, frozen weights). This times one epoch of `fit` on CIFAR-10 (batch 512, beta 0.5, PGD-7)
per mode after a warm-up epoch, and checks the compiled attack against the eager one: PGD-7 accuracy
of a shipped model on the first test images with the same random starts. Run time on one H100: ~3 min,
most of it compilation.

    python benchmarks/robust_step.py [--file TrainedModels/R1.etm] [--images 2000] [--json OUT.json]
"""
import argparse
import json
import time

import torch

from elastictrain import attacks
from elastictrain.accuracy import evaluate
from elastictrain.data import GpuLoader, load_split
from elastictrain.models import create_model
from elastictrain.storage import load_compressed
from elastictrain.train import TrainConfig, fit, prepare_model


def epoch_seconds(mode, loader, test):
    config = TrainConfig(epochs=2, lr=0.01, schedule="cosine", warmup=0.0, eval_every=0, adversarial_beta=0.5,
                         adv_steps=7, compile=mode)
    _, history = fit(create_model("vgg16"), loader, test, config, progress=False)
    return float(history["epoch_time_s"].iloc[-1])


def pgd_accuracy(model, batches, forward, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    adv = [(attacks.pgd(model, x, y, steps=7, generator=g, forward=forward), y) for x, y in batches]
    return evaluate(model, adv)["top1"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="TrainedModels/R1.etm")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    train = GpuLoader(load_split("cifar10", train=True), 512, train=True, device="cuda")
    test = GpuLoader(load_split("cifar10", train=False).subset(1000), 500, train=False, device="cuda")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for mode in (None, "reduce-overhead"):
        out[f"epoch_s_{mode or 'eager'}"] = round(epoch_seconds(mode, train, test), 2)
        print(out, flush=True)
    model = prepare_model(load_compressed(args.file), "cuda")
    batches = list(GpuLoader(load_split("cifar10", train=False).subset(args.images), 500, train=False, device="cuda"))
    graphed = torch.compile(model, mode="reduce-overhead")
    out["pgd7_eager"] = round(pgd_accuracy(model, batches, None), 2)
    out["pgd7_compiled"] = round(pgd_accuracy(model, batches, graphed), 2)
    t = {}
    for name, fwd in (("eager", None), ("compiled", graphed)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y in batches:
            attacks.pgd(model, x, y, steps=7, forward=fwd)
        torch.cuda.synchronize()
        t[name] = time.perf_counter() - t0
    out["pgd7_images_per_s"] = {k: round(len(batches) * 500 / v) for k, v in t.items()}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
