"""Short robust runs (VGG16 at 20x, DNR's hybrid loss) to choose notebook 16's settings.

Each run is notebook 16's recipe cut to EPOCHS epochs (RAMP of them ramp): dense VGG16 -> gradual LAMP
pruning to 20x (R1 unstructured, R2 kernel) with beta 0.5 and PGD-7 at 8/255, step 0.01, compiled, then
the final model's clean accuracy on the full test set, and PGD-7 on all 10,000 images (measured from the
written file, as notebook 16 does). Optional aids: --distill ALPHA (distillation from
the dense VGG16 inside the clean term, objectives.objective), --average DECAY (a weight average from the
ramp's end on, elastictrain.averaging), --pgd-step (the training attack's step; spec §5.9 allows 2/255)
--bn-stats clean (BatchNorm statistics from the clean half of each batch, attacks.use_clean_statistics),
--attack-bn batch (the training attack normalises with its batch's own statistics, spec §5.9's option),
--allocation (the layer budgets: LAMP, ERK or uniform, prune.masks) and --rewire R (DNR/RigL rewiring
during the ramp, the fraction of survivors swapped at its first update: weights for R1, kernels for R2,
prune.schedule) and --sam RHO (sharpness-aware minimisation, elastictrain.sam).
It writes TrainedModels/<row>.etm and checkpoints/.<row>.run, so run each variant in its own copy of the
repository. On one H100 a run takes ~70 s alone, ~260 s with four side by side. Results and the machine
they ran on: benchmarks/results/robust_variants.md.

    python benchmarks/robust_variants.py LR EPOCHS RAMP LABEL_SMOOTHING WEIGHT_DECAY BATCH [--row R2]
        [--distill ALPHA] [--average DECAY] [--pgd-step STEP] [--bn-stats {mixed,clean}]
        [--attack-bn {eval,batch}] [--allocation {lamp,erk,uniform}] [--rewire R] [--sam RHO]
    python benchmarks/robust_variants.py 0.2 24 8 0.0 5e-4 512 --distill 0.9 --average 0.998
"""
import argparse

from elastictrain import load_compressed, robust
from elastictrain.prune import PruneSpec
from elastictrain.prune.recipe import PruneRecipe, run_row
from elastictrain.train import TrainConfig

p = argparse.ArgumentParser()
for name, kind in (("lr", float), ("epochs", int), ("ramp", int), ("label_smoothing", float),
                   ("weight_decay", float), ("batch", int)):
    p.add_argument(name, type=kind)
p.add_argument("--row", choices=("R1", "R2"), default="R1")
p.add_argument("--distill", type=float, default=0.0)
p.add_argument("--average", type=float, default=0.0)
p.add_argument("--pgd-step", type=float, default=0.01)
p.add_argument("--bn-stats", choices=("mixed", "clean"), default="mixed")
p.add_argument("--attack-bn", choices=("eval", "batch"), default="eval")
p.add_argument("--allocation", choices=("lamp", "erk", "uniform"), default="lamp")
p.add_argument("--rewire", type=float, default=0.0)
p.add_argument("--sam", type=float, default=0.0)
a = p.parse_args()
spec = PruneSpec("unstructured" if a.row == "R1" else "kernel", allocation=a.allocation)
r = run_row(PruneRecipe(row=a.row, spec=spec, ratio=20, ramp_epochs=a.ramp, base="vgg16", batch_size=a.batch,
                        teacher="vgg16" if a.distill else None, average=a.average, rewire=a.rewire,
                        train=TrainConfig(epochs=a.epochs, lr=a.lr, schedule="cosine", warmup=0.0,
                                          hold=a.ramp / a.epochs, weight_decay=a.weight_decay,
                                          label_smoothing=a.label_smoothing, seed=0, adversarial_beta=0.5,
                                          adv_eps=8 / 255, adv_steps=7, adv_step_size=a.pgd_step,
                                          adv_bn_stats=a.bn_stats, adv_attack_bn=a.attack_bn,
                                          distill_alpha=a.distill, sam_rho=a.sam, compile="reduce-overhead")),
            smoke=False, progress=False)
pgd = robust.robust_evaluate(load_compressed(r.path), attacks=("pgd7",))["pgd7"]
print(f"EXP {a.row} lr {a.lr} ls {a.label_smoothing} wd {a.weight_decay} batch {a.batch} distill {a.distill} "
      f"average {a.average} pgd_step {a.pgd_step:.5f} bn_stats {a.bn_stats} attack_bn {a.attack_bn} "
      f"allocation {a.allocation} rewire {a.rewire} sam {a.sam}: "
      f"final clean {r.accuracy:.2f} PGD-7 {pgd:.2f} (raw last epoch, bf16: "
      f"{r.history['test_top1'].iloc[-1]:.2f}) epoch_s {r.history['epoch_time_s'].median():.2f}", flush=True)
print(r.history.tail(4).to_string())
