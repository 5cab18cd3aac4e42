"""The compact model file (``.etm``) used for everything in ``TrainedModels/``.

Layout: ``b"ETCM"`` | u8 version | u32 header length | zlib(JSON header) | payload.
The header holds the architecture (``model.arch``, so CUP's non-uniform widths rebuild with no
extra input), free-form ``meta`` (row id, recorded accuracy), a CRC32 of the payload and, per
tensor, its encoding and byte sections. Nothing is unpickled on load.

Sparse weights store non-zero positions as gaps, Rice-coded with the unary and the fixed-width
parts in two separate bit streams (both then decode with vectorised numpy, no Python loop), and the
non-zero values, or, for a quantized model, codes into per-group codebooks (one per group of a
``Structure``). A bitmap index would cost 1 bit per weight (1.84 MB for VGG16) and cap every model
near 32×; gap coding costs ~log2(1/density)+1.5 bits per non-zero (spec §5.11).

Every encoding is lossless: ``load_compressed`` rebuilds the saved tensors bit for bit (one
exception: a conv/linear weight's zeros all load as +0.0, the sign of a masked -0.0 is not kept). The
encoder picks, per tensor, the cheapest exact form: values go in fp16 only when every one of them
is exactly an fp16 number, a tensor of one repeated value is stored once, a mostly-zero parameter
vector is stored sparse. So a model whose parameters were made cheap on purpose
(``quant.compact``: BatchNorm folded to scale and shift, dead channels zeroed, fp16-snapped) is
stored cheaply, and any other model exactly as before.

Version 2 (this writer) added fp16 values, constant and sparse parameters and the compact codebook
layout; version-1 files (the first shipped models) use a subset of it and still load.
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

MAGIC, VERSION = b"ETCM", 2
READABLE = (1, 2)
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


def pack_varbits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack value i at ``widths[i]`` bits (0 allowed), MSB first, one stream with no padding between."""
    values, widths = np.asarray(values, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    if len(values) == 0 or widths.sum() == 0:
        return b""
    if np.any(values >> widths):
        raise ValueError("a value does not fit in its width")
    bits = np.zeros(int(widths.sum()), dtype=np.uint8)
    start = np.cumsum(widths) - widths
    for b in range(int(widths.max())):  # at most 8 rounds (codes are <= 8 bits), each vectorised
        sel = widths > b
        bits[start[sel] + b] = (values[sel] >> (widths[sel] - 1 - b)) & 1
    return np.packbits(bits).tobytes()


def unpack_varbits(data: bytes, widths: np.ndarray) -> np.ndarray:
    widths = np.asarray(widths, dtype=np.int64)
    out = np.zeros(len(widths), dtype=np.int64)
    if len(widths) == 0 or widths.sum() == 0:
        return out
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(widths.sum())).astype(np.int64)
    start = np.cumsum(widths) - widths
    for b in range(int(widths.max())):
        sel = widths > b
        out[sel] = (out[sel] << 1) | bits[start[sel] + b]
    return out


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


def _floats(values: np.ndarray) -> tuple[str, bytes]:
    """fp32 values as fp16 bytes when every one is exactly an fp16 number (bit for bit), else fp32."""
    values = np.ascontiguousarray(values, dtype="<f4")
    half = values.astype("<f2")
    if np.array_equal(half.astype("<f4").view("<u4"), values.view("<u4")):
        return "f2", half.tobytes()
    return "f4", values.tobytes()


def _vd(vdtype: str) -> dict:
    return {"vdtype": vdtype} if vdtype != "f4" else {}  # fp32, the default, is left out of the header


def _encode_codebook(entry, t, quant):
    """Positions as for sparse weights; then, per non-empty group, its count of distinct values
    (``bits`` bits, as count - 1) and those values in ascending order (fp16 when exact); then each
    non-zero's index into its group's values at ceil(log2(count)) bits: a group that needs fewer than
    2^bits values costs fewer bits (a 1-value group costs none)."""
    flat = t.flatten().numpy()
    pos = np.flatnonzero(flat)
    vals = flat[pos]
    groups = block_ids(tuple(t.shape), quant.structure).flatten().numpy()[pos]
    n_groups, k = quant.structure.num_blocks(tuple(t.shape)), quant.levels
    order = np.lexsort((vals, groups))                      # by group, then value
    g_s, v_s = groups[order], vals[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (g_s[1:] != g_s[:-1]) | (v_s[1:].view("<u4") != v_s[:-1].view("<u4"))
    book_group = g_s[new]                                   # group of each distinct (group, value)
    counts = np.bincount(book_group, minlength=n_groups)
    if len(pos) and counts.max() > k:
        g = int(counts.argmax())
        raise StorageError(f"{entry['name']}: codebook group {g} holds {counts[g]} distinct non-zero values, "
                           f"more than {k} ({quant.bits} bits); quantize the model first")
    first = np.cumsum(counts) - counts                      # index of each group's first value in the book
    codes = np.empty(len(pos), dtype=np.int64)
    codes[order] = np.cumsum(new) - 1 - first[g_s]
    widths = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)[groups]
    nonempty = np.flatnonzero(counts)
    book_dtype, book = _floats(v_s[new])
    info, unary, rem = encode_positions(pos)
    entry.update(enc="codebook", layout=2, nnz=len(pos), bits=quant.bits,
                 structure=list(quant.structure.as_tuple()), groups=n_groups, book=book_dtype, **info)
    return entry, [("index", unary), ("index", rem), ("values", pack_varbits(codes, widths)),
                   ("codebooks", pack_bits(counts[nonempty] - 1, quant.bits)), ("codebooks", book)]


def _decode_codebook(entry, blobs, pos):
    shape, nnz = entry["shape"], entry["nnz"]
    groups = block_ids(tuple(shape), Structure(*entry["structure"])).flatten().numpy()[pos]
    if entry.get("layout", 1) == 1:  # first layout: fp32 [G, 2^bits] books, fixed-width codes
        book = np.frombuffer(blobs[3], dtype="<f4").reshape(entry["groups"], -1)
        return book[groups, unpack_bits(blobs[2], entry["bits"], nnz)]
    nonempty = np.unique(groups)
    counts = np.zeros(entry["groups"], dtype=np.int64)
    counts[nonempty] = unpack_bits(blobs[3], entry["bits"], len(nonempty)) + 1
    book = np.frombuffer(blobs[4], dtype="<" + entry["book"]).astype(np.float32)
    first = np.cumsum(counts) - counts
    widths = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)[groups]
    return book[first[groups] + unpack_varbits(blobs[2], widths)]


def _encode_param(entry, t):
    """A non-weight float32 tensor (bias, BatchNorm, buffer): the cheapest exact form of dense,
    one repeated value, or sparse (positions + non-zero values)."""
    flat = t.flatten().numpy()
    vdtype, blob = _floats(flat)
    options = [({"enc": "dense", **_vd(vdtype)}, [("params", blob)])]
    if flat.size and np.all(flat.view("<u4") == flat.view("<u4")[0]):
        options.append(({"enc": "const"}, [("params", flat[:1].astype("<f4").tobytes())]))
    pos = np.flatnonzero(flat.view("<u4"))  # by bit pattern: a -0.0 is stored, so it loads as -0.0
    info, unary, rem = encode_positions(pos)
    vdtype, values = _floats(flat[pos])
    options.append(({"enc": "sparse", "nnz": len(pos), **_vd(vdtype), **info},
                    [("params", unary), ("params", rem), ("params", values)]))
    fields, sections = min(options, key=lambda o: sum(len(b) for _, b in o[1]))  # first of equals: dense
    entry.update(fields)
    return entry, sections


def _encode_tensor(name, t, prunable, quant=None):
    t = t.detach().cpu().contiguous()
    entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.dtype != torch.float32:
        entry["enc"] = "dense"
        return entry, [("weights" if prunable else "params", t.numpy().tobytes())]
    if not prunable:
        return _encode_param(entry, t)
    if quant is not None:
        return _encode_codebook(entry, t, quant)
    flat = t.flatten().numpy()
    pos = np.flatnonzero(flat)
    info, unary, rem = encode_positions(pos)
    vdtype, values = _floats(flat[pos])
    dense_dtype, dense = _floats(flat)
    if len(unary) + len(rem) + len(values) < len(dense):
        entry.update(enc="sparse", nnz=len(pos), **_vd(vdtype), **info)
        return entry, [("index", unary), ("index", rem), ("values", values)]
    entry.update(enc="dense", **_vd(dense_dtype))
    return entry, [("weights", dense)]


def save_compressed(model: nn.Module, path, meta: dict | None = None, quant=None) -> int:
    """Write ``model`` as an ``.etm`` file (atomically) and return its size in bytes.

    ``quant`` (a ``quant.QuantSpec``) stores every conv/linear weight as codes into per-group
    codebooks; each group must already hold at most 2^bits distinct non-zero values.
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
    if version not in READABLE:
        raise StorageError(f"{path}: format version {version}, this code reads {', '.join(map(str, READABLE))}; "
                           "upgrade elastictrain")
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
    vdtype = "<" + entry.get("vdtype", "f4")
    if entry["enc"] == "dense":
        if dtype != torch.float32:
            return torch.frombuffer(bytearray(blobs[0]), dtype=dtype).reshape(shape).clone()
        return torch.from_numpy(np.frombuffer(blobs[0], dtype=vdtype).astype(np.float32)).reshape(shape)
    if entry["enc"] == "const":
        return torch.full(shape, float(np.frombuffer(blobs[0], dtype="<f4")[0]), dtype=torch.float32)
    pos = decode_positions(entry, blobs[0], blobs[1], entry["nnz"])
    flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
    if entry["enc"] == "codebook":
        flat[pos] = _decode_codebook(entry, blobs, pos)
    else:
        flat[pos] = np.frombuffer(blobs[2], dtype=vdtype)
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


KINDS = ("index", "values", "codebooks", "weights", "params")


def byte_report(path) -> dict:
    """Bytes of the file by what they hold; every entry but ``total`` sums to ``total``, the file size.
    ``index``, ``values`` and ``codebooks`` are the conv/linear weights' (sparse or quantized),
    ``weights`` dense ones, ``params`` everything else (biases, BatchNorm, buffers)."""
    header, _, size = _read(path)
    report = {"header": size - header["payload_bytes"], **{k: 0 for k in KINDS}}
    for e in header["tensors"]:
        for kind, _, n in e["sections"]:
            report[kind] += n
    report["total"] = size
    return report


def tensor_bytes(path) -> list[dict]:
    """Per stored tensor: its encoding and payload bytes by kind (the header's bytes are not in here:
    these rows plus ``byte_report(path)["header"]`` sum to the file size)."""
    rows = []
    for e in read_header(path)["tensors"]:
        row = {"tensor": e["name"], "enc": e["enc"], "dtype": e.get("book", e.get("vdtype", "f4")),
               **{k: 0 for k in KINDS}}
        for kind, _, n in e["sections"]:
            row[kind] += n
        row["bytes"] = sum(row[k] for k in KINDS)
        rows.append(row)
    return rows
