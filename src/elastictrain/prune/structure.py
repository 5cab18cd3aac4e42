"""ElasticTrain's ``Structure``: how a conv weight [filter, channel, row, column] is cut into blocks.

Each of the four dimensions gets ``EACH`` (every index its own group), ``ANY`` (one group spanning
the dimension) or an integer g (min(g, dim) equal groups), exactly as ModelEval's
``ModuleStructuralIterator`` (spec elastictrain.md §2.5). Linear weights are viewed as [F, C, 1, 1].
Blocks are enumerated filter-major (filter → channel → row → column), as ModelEval iterates them.

``blocks(w, s)`` is a reshape + permute, never a Python loop: it returns a [G, block_size] view-copy
whose row g holds block g's elements, and ``unblocks`` inverts it.
"""
from dataclasses import dataclass

import torch

EACH = 10 ** 9
ANY = 1


@dataclass(frozen=True)
class Structure:
    filter: int = ANY
    channel: int = ANY
    row: int = ANY
    column: int = ANY

    def __post_init__(self):
        if any(not isinstance(g, int) or g < 1 for g in self.as_tuple()):
            raise ValueError(f"each dimension takes EACH, ANY or a positive number of groups, got {self}")

    def groups(self, shape) -> tuple[int, int, int, int]:
        """Number of groups along each dimension of a 4-D ``shape``; refuses uneven splits."""
        out = []
        for g, n, dim in zip(self.as_tuple(), shape, ("filter", "channel", "row", "column")):
            g = min(g, n)
            if n % g:
                raise ValueError(f"{dim} dimension of size {n} does not split into {g} equal groups "
                                 f"(structure {self})")
            out.append(g)
        return tuple(out)

    def as_tuple(self):
        return (self.filter, self.channel, self.row, self.column)

    def num_blocks(self, shape) -> int:
        gf, gc, gr, gk = self.groups(as_4d_shape(shape))
        return gf * gc * gr * gk


KERNEL = Structure(EACH, EACH, ANY, ANY)        # one k×k kernel (PatDNN "connectivity")
FILTER = Structure(EACH, ANY, ANY, ANY)
WORKLOAD = Structure(16, 4, ANY, ANY)          # ElasticTrain's 64 processing-element blocks
LAYER = Structure(ANY, ANY, ANY, ANY)


def as_4d_shape(shape) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) == 2:
        return (*shape, 1, 1)
    if len(shape) != 4:
        raise ValueError(f"structures apply to conv [F, C, kh, kw] or linear [F, C] weights, not {shape}")
    return shape


def blocks(w: torch.Tensor, s: Structure) -> torch.Tensor:
    """[G, block_size] with row g = the elements of block g (filter-major block order)."""
    shape = as_4d_shape(w.shape)
    gf, gc, gr, gk = s.groups(shape)
    f, c, r, k = shape
    x = w.reshape(gf, f // gf, gc, c // gc, gr, r // gr, gk, k // gk)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(gf * gc * gr * gk, -1)


def unblocks(b: torch.Tensor, s: Structure, shape) -> torch.Tensor:
    """Inverse of ``blocks``: back to a tensor of ``shape``."""
    shape4 = as_4d_shape(shape)
    gf, gc, gr, gk = s.groups(shape4)
    f, c, r, k = shape4
    x = b.reshape(gf, gc, gr, gk, f // gf, c // gc, r // gr, k // gk)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(shape)


def block_ids(shape, s: Structure) -> torch.Tensor:
    """Integer block id of every element, shaped like the weight."""
    n = s.num_blocks(shape)
    ids = torch.arange(n).repeat_interleave(torch.Size(as_4d_shape(shape)).numel() // n)
    return unblocks(ids.reshape(n, -1), s, shape)
