"""CUP: cluster pruning with one global threshold t, removing filters physically; CUP-SS."""
from .cluster import Pair, cluster_keep, features, pairs_for
from .single_shot import CupSS
from .surgery import cup_prune, find_t, rank_prune

__all__ = ["CupSS", "Pair", "cluster_keep", "features", "pairs_for", "cup_prune", "find_t", "rank_prune"]
