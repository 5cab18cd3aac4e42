"""CUP: cluster pruning with one global threshold t, removing filters physically."""
from .cluster import Pair, cluster_keep, features, pairs_for
from .surgery import cup_prune, find_t

__all__ = ["Pair", "cluster_keep", "features", "pairs_for", "cup_prune", "find_t"]
