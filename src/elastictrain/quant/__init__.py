"""Weight sharing: exact 1-D k-means, multi-codebook quantization with trained centroids."""
from .codebook import QuantSpec, bake_, build_codebook, codebooks, group_table, quantize_, unique_per_group
from .kmeans import kmeans_1d

__all__ = ["QuantSpec", "bake_", "build_codebook", "codebooks", "group_table", "quantize_", "unique_per_group", "kmeans_1d"]
