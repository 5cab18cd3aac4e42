"""Short R1 runs (robust VGG16, 20x unstructured) to choose notebook 16's optimiser settings.

Each run is notebook 16's R1 recipe cut to 24 epochs (8 of ramp): dense VGG16 -> gradual LAMP pruning to
20x with DNR's hybrid loss (beta 0.5, PGD-7 at 8/255, step 0.01), compiled, then the final-epoch clean
accuracy on the full test set. It writes TrainedModels/R1.etm and checkpoints/.R1.run, so run each variant
in its own copy of the repository. On one H100 a run takes ~70 s alone, ~260 s with four side by side.
Results and the machine they ran on: benchmarks/results/robust_variants.md.

    python benchmarks/robust_variants.py LR EPOCHS RAMP LABEL_SMOOTHING WEIGHT_DECAY BATCH
    python benchmarks/robust_variants.py 0.2 24 8 0.0 5e-4 512
"""
import sys

from elastictrain.prune import PruneSpec
from elastictrain.prune.recipe import PruneRecipe, run_row
from elastictrain.train import TrainConfig

lr, epochs, ramp, ls, wd, batch = (float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                   float(sys.argv[5]), int(sys.argv[6]))
r = run_row(PruneRecipe(row="R1", spec=PruneSpec("unstructured"), ratio=20, ramp_epochs=ramp, base="vgg16",
                        batch_size=batch,
                        train=TrainConfig(epochs=epochs, lr=lr, schedule="cosine", warmup=0.0, hold=ramp / epochs,
                                          weight_decay=wd, label_smoothing=ls, seed=0, adversarial_beta=0.5,
                                          adv_eps=8 / 255, adv_steps=7, adv_step_size=0.01, compile="reduce-overhead")),
            smoke=False, progress=False)
print(f"EXP {lr} {ls} {wd} {batch} final clean {r.accuracy:.2f} epoch_s {r.history['epoch_time_s'].median():.2f}",
      flush=True)
print(r.history.tail(4).to_string())
