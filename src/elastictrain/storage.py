"""The compact model file (``.etm``) used for everything in ``TrainedModels/``.

Layout: ``b"ETCM"`` | u8 version | u32 header length | zlib(JSON header) | payload.
The header holds the architecture (``model.arch``, so CUP's non-uniform widths rebuild with no
extra input), free-form ``meta`` (row id, recorded accuracy), a CRC32 of the payload and, per
tensor, its encoding and byte sections. Nothing is unpickled on load.

Sparse weights store non-zero positions as gaps, Rice-coded with the unary and the fixed-width
parts in two separate bit streams (both then decode with vectorised numpy, no Python loop), and the
non-zero values in fp32, or, for a quantized model, as ``bits``-bit codes into fp32 codebooks (one
per group of a ``Structure``), so ``load_compressed`` rebuilds the trained weights bit for bit. A bitmap
index would cost 1 bit per weight (1.84 MB for VGG16) and cap every model near 32×; gap coding
costs ~log2(1/density)+1.5 bits per non-zero (spec §5.11).
"""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import atomic_write
from .models import create_model
from .models.common import prunable_weights
from .prune.structure import Structure, block_ids

MAGIC, VERSION = b"ETCM", 1
_PREFIX = struct.Struct("<4sBI")


class StorageError(ValueError):
    """A model file that is not ours, or is truncated or corrupted."""


def pack_bits(values: np.ndarray, nbits: int) -> bytes:
    """Pack unsigned integers < 2**nbits at ``nbits`` bits each, MSB first."""
    if nbits == 0 or len(values) == 0:
        return b""
    values = np.asarray(values, dtype=np.uint64)
    if values.max() >> np.uint64(nbits):
        raise ValueError(f"a value does not fit in {nbits} bits")
    shifts = np.arange(nbits - 1, -1, -1, dtype=np.uint64)
    return np.packbits(((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)).tobytes()


def unpack_bits(data: bytes, nbits: int, count: int) -> np.ndarray:
    if nbits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * nbits).reshape(count, nbits)
    return bits.astype(np.int64) @ (1 << np.arange(nbits - 1, -1, -1, dtype=np.int64))


def _rice_param(gaps: np.ndarray) -> int:
    # Total bits for parameter k: sum(gap >> k) unary ones + n terminators + n*k remainder bits.
    costs = [int((gaps >> k).sum()) + len(gaps) * (1 + k) for k in range(32)]
    return int(np.argmin(costs))


def encode_positions(pos: np.ndarray) -> tuple[dict, bytes, bytes]:
    gaps = np.diff(pos, prepend=-1) - 1
    k = _rice_param(gaps) if len(gaps) else 0
    q = gaps >> k
    unary = np.ones(int(q.sum()) + len(q), dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0  # each quotient: q ones then a terminating zero
    return ({"k": k, "unary_bits": len(unary)}, np.packbits(unary).tobytes(),
            pack_bits(gaps & ((1 << k) - 1), k))


def decode_positions(info: dict, unary: bytes, remainder: bytes, nnz: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8), count=info["unary_bits"])
    ends = np.flatnonzero(bits == 0)
    if len(ends) != nnz:
        raise StorageError(f"position stream holds {len(ends)} entries, header says {nnz}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = (q << info["k"]) | unpack_bits(remainder, info["k"], nnz)
    return np.cumsum(gaps + 1) - 1


def _encode_codebook(entry, t, quant):
    """Positions as for sparse weights, then ``bits``-bit codes into per-group codebooks [G, K]."""
    flat = t.flatten().numpy()
    pos = np.flatnonzero(flat)
    groups = block_ids(tuple(t.shape), quant.structure).flatten().numpy()[pos]
    n_groups, k = quant.structure.num_blocks(tuple(t.shape)), quant.levels
    book = np.zeros((n_groups, k), dtype="<f4")
    codes = np.zeros(len(pos), dtype=np.int64)
    for g in np.unique(groups):
        sel = groups == g
        values = np.unique(flat[pos][sel])
        if len(values) > k:
            raise StorageError(f"{entry['name']}: a codebook group holds {len(values)} distinct non-zero values, "
                               f"more than {k} ({quant.bits} bits); quantize the model first")
        book[g, :len(values)] = values
        book[g, len(values):] = values[0]
        codes[sel] = np.searchsorted(values, flat[pos][sel])
    info, unary, rem = encode_positions(pos)
    entry.update(enc="codebook", nnz=len(pos), bits=quant.bits, structure=list(quant.structure.as_tuple()),
                 groups=n_groups, **info)
    return entry, [("index", unary), ("index", rem), ("values", pack_bits(codes, quant.bits)),
                   ("codebooks", book.tobytes())]


def _encode_tensor(name, t, sparse_ok, quant=None):
    t = t.detach().cpu().contiguous()
    dense = t.numpy().tobytes()
    entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if sparse_ok and quant is not None:
        return _encode_codebook(entry, t, quant)
    if sparse_ok and t.dtype == torch.float32:
        flat = t.flatten().numpy()
        pos = np.flatnonzero(flat)
        info, unary, rem = encode_positions(pos)
        values = flat[pos].astype("<f4").tobytes()
        if len(unary) + len(rem) + len(values) < len(dense):
            entry.update(enc="sparse", nnz=len(pos), **info)
            return entry, [("index", unary), ("index", rem), ("values", values)]
    entry["enc"] = "dense"
    return entry, [("weights" if sparse_ok else "params", dense)]


def save_compressed(model: nn.Module, path, meta: dict | None = None, quant=None) -> int:
    """Write ``model`` as an ``.etm`` file (atomically) and return its size in bytes.

    ``quant`` (a ``quant.QuantSpec``) stores every conv/linear weight as ``bits``-bit codes into
    per-group codebooks; each group must already hold at most 2^bits distinct non-zero values.
    """
    if not hasattr(model, "arch"):
        raise ValueError("the model has no .arch: build it with elastictrain.models.create_model")
    if any(".parametrizations." in k for k in model.state_dict()):
        raise ValueError("the model still has shared-weight parametrizations: call quant.bake_(model) first")
    weights = set(prunable_weights(model))
    entries, payload, offset = [], bytearray(), 0
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # a training counter, irrelevant for inference
        entry, sections = _encode_tensor(name, t, name in weights, quant)
        entry["sections"] = []
        for kind, blob in sections:
            entry["sections"].append([kind, offset, len(blob)])
            payload += blob
            offset += len(blob)
        entries.append(entry)
    header = {"format": "elastictrain-compact", "version": VERSION, "arch": model.arch,
              "meta": meta or {}, "payload_bytes": len(payload),
              "payload_crc32": zlib.crc32(payload), "tensors": entries}
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    data = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + bytes(payload)
    atomic_write(Path(path), lambda f: f.write(data))
    return len(data)


def _read(path) -> tuple[dict, memoryview, int]:
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path}: no such model file (shipped models live in TrainedModels/)")
    data = path.read_bytes()
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise StorageError(f"{path}: not an ElasticTrain compact model (.etm) file; dense training "
                           "checkpoints are read with elastictrain.checkpoints.load_checkpoint")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise StorageError(f"{path}: format version {version}, this code reads {VERSION}; upgrade elastictrain")
    try:
        header = json.loads(zlib.decompress(data[_PREFIX.size:_PREFIX.size + hlen]))
    except (zlib.error, ValueError) as e:
        raise StorageError(f"{path}: header is truncated or corrupted ({e}); re-fetch the file from git") from e
    payload = memoryview(data)[_PREFIX.size + hlen:]
    if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["payload_crc32"]:
        raise StorageError(f"{path}: payload is truncated or corrupted ({len(payload)} bytes, header says "
                           f"{header['payload_bytes']}, or CRC mismatch); re-fetch the file from git "
                           "(`git checkout -- TrainedModels/`)")
    return header, payload, len(data)


def read_header(path) -> dict:
    return _read(path)[0]


def _decode_tensor(entry, payload):
    blobs = [bytes(payload[o:o + n]) for _, o, n in entry["sections"]]
    dtype = getattr(torch, entry["dtype"])
    shape = entry["shape"]
    if entry["enc"] == "dense":
        return torch.frombuffer(bytearray(blobs[0]), dtype=dtype).reshape(shape).clone()
    pos = decode_positions(entry, blobs[0], blobs[1], entry["nnz"])
    flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
    if entry["enc"] == "codebook":
        book = np.frombuffer(blobs[3], dtype="<f4").reshape(entry["groups"], -1)
        groups = block_ids(tuple(shape), Structure(*entry["structure"])).flatten().numpy()[pos]
        flat[pos] = book[groups, unpack_bits(blobs[2], entry["bits"], entry["nnz"])]
    else:
        flat[pos] = np.frombuffer(blobs[2], dtype="<f4")
    return torch.from_numpy(flat).reshape(shape)


def load_compressed(path) -> nn.Module:
    """Rebuild a shipped model: on the CPU, in eval mode, taking [0, 1] inputs."""
    header, payload, _ = _read(path)
    arch = header["arch"]
    model = create_model(arch["name"], **arch["kwargs"])
    state = {e["name"]: _decode_tensor(e, payload) for e in header["tensors"]}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise StorageError(f"{path}: tensors do not fit {arch['name']} (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    model.meta = header["meta"]
    return model.eval()


def byte_report(path) -> dict:
    """Bytes of the file by what they hold; every entry but ``total`` sums to ``total``, the file size."""
    header, _, size = _read(path)
    report = {"header": size - header["payload_bytes"], "index": 0, "values": 0, "codebooks": 0,
              "weights": 0, "params": 0}
    for e in header["tensors"]:
        for kind, _, n in e["sections"]:
            report[kind] += n
    report["total"] = size
    return report
