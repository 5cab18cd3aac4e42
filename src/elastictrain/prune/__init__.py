"""ElasticTrain's pruning engine: structures, mask makers, the gradual schedule and row recipes."""
from .admm import ADMMCallback, AdmmSchedule
from .masks import PruneSpec, make_masks, pattern_library
from .schedule import MaskCallback, density_at
from .structure import ANY, EACH, KERNEL, WORKLOAD, Structure

__all__ = ["ANY", "EACH", "KERNEL", "WORKLOAD", "Structure", "PruneSpec", "make_masks", "pattern_library",
           "MaskCallback", "density_at", "ADMMCallback", "AdmmSchedule"]
