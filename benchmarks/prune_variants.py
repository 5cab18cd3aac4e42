"""Row 02 (E2: VGG16 50x -> 500x unstructured, from TrainedModels/E1.etm) with one knob changed, to
tell apart what the notebook's recipe owes to rewiring and to distillation.

Each run is notebook 02's recipe (60 ramp + 140 fine-tuning epochs, lr 0.05 held then cosine, wd 5e-4,
label smoothing 0.1, compiled) with the given rewiring fraction and distillation weight, then the
final-epoch accuracy on the full test set. It writes TrainedModels/E2.etm and checkpoints/.E2.run, so
run each variant in its own copy of the repository, never in the one whose E2.etm is shipped.
Results and the machine they ran on: benchmarks/results/prune_variants.md.

    python benchmarks/prune_variants.py REWIRE DISTILL
    python benchmarks/prune_variants.py 0.0 0.9
"""
import sys

from elastictrain.prune import PruneSpec
from elastictrain.prune.recipe import PruneRecipe, run_row
from elastictrain.train import TrainConfig

rewire, distill = float(sys.argv[1]), float(sys.argv[2])
r = run_row(PruneRecipe(row="E2", spec=PruneSpec("unstructured"), ratio=500, ramp_epochs=60, base="E1",
                        teacher="vgg16" if distill else None, rewire=rewire,
                        train=TrainConfig(epochs=200, lr=0.05, schedule="cosine", warmup=0.0, hold=60 / 200,
                                          weight_decay=5e-4, label_smoothing=0.1, seed=0, distill_alpha=distill,
                                          compile="reduce-overhead")),
            smoke=False, progress=False)
h = r.history
print(f"EXP rewire {rewire} distill {distill}: final {r.accuracy:.2f}% at {r.ratio:.2f}x; epoch s: ramp "
      f"{h['epoch_time_s'][1:60].median():.3f}, after {h['epoch_time_s'][60:].median():.3f}", flush=True)
print(h.iloc[[0, 29, 59, 99, 149, 199]].to_string())
