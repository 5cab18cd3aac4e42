"""Independent re-measurement of shipped models: the numbers behind `python -m elastictrain table`.

Everything here starts from the file alone: it is loaded with ``load_compressed``, evaluated in
float32 on the full official test set, and its compression is counted from the rebuilt weights
and the file's bytes, never taken from what the training run recorded.
"""
from pathlib import Path

import torch

from .accuracy import evaluate
from .checkpoints import scratch_dir, sha256_file
from .flops import count_flops, count_params
from .metrics import count_weights, dense_fp32_bytes, paper_compression
from .models import create_model
from .rows import ROWS
from .storage import load_compressed, save_compressed


def trained_models_dir() -> Path:
    """``./TrainedModels`` when run from a checkout, else the one beside the source tree."""
    here = Path.cwd() / "TrainedModels"
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "TrainedModels"


def load_shipped(row: str) -> tuple:
    """``(model, base record)`` for a row that continues from ``TrainedModels/<row>.etm``."""
    path = trained_models_dir() / f"{row}.etm"
    model = load_compressed(path)
    return model, {"base": row, "base_sha256": sha256_file(path), "base_accuracy": model.meta.get("accuracy")}


def shipped_models(folder=None) -> list[Path]:
    return sorted(Path(folder or trained_models_dir()).glob("*.etm"))


def measure(path, device="cpu", dataset=None) -> dict:
    """Load one ``.etm`` file and measure it; the row (paper figures) comes from its file name."""
    path = Path(path)
    model = load_compressed(path).to(device)
    row = ROWS.get(path.stem)
    meta = getattr(model, "meta", {})
    bits = int(meta.get("bits", 32))
    dataset = dataset or (row.dataset if row else meta.get("dataset", "cifar10"))
    acc = evaluate(model, dataset, device=device)  # float32: amp is off unless asked for
    total, nonzero = count_weights(model)
    # The reference is the unpruned architecture: the same tensors for a masked model, the full
    # widths for one CUP shrank physically.
    unpruned = create_model(model.arch["name"])
    size, dense = path.stat().st_size, dense_fp32_bytes(unpruned)
    out = {
        "row": path.stem, "file": str(path.name), "notebook": row.notebook if row else None,
        "description": row.description if row else meta.get("description"),
        "paper_accuracy": row.paper_accuracy if row else None,
        "paper_compression": row.paper_compression if row else None,
        "compression_kind": row.compression_kind if row else "paper-style",
        "accuracy": round(acc["top1"], 2), "top5": round(acc["top5"], 2), "test_images": acc["n"],
        "weights": total, "nonzeros": nonzero, "bits": bits,
        "compression": paper_compression(model, bits), "file_bytes": size,
        "dense_fp32_bytes": dense, "honest_compression": dense / size,
        "flops": count_flops(model), "flops_nonzero": count_flops(model, nonzero_only=True),
        "params": count_params(model), "base_flops": count_flops(unpruned), "base_params": count_params(unpruned),
        "recorded_accuracy": meta.get("accuracy"),
    }
    if out["compression_kind"] == "FR":  # CUP rows: FLOPs reduction against the unpruned architecture
        out["compression"] = out["base_flops"] / out["flops"]
    return out


def format_table(results: list[dict]) -> str:
    if not results:
        return "no shipped models in TrainedModels/ yet (see README: reproduction status)"
    head = (f"{'row':<5} {'description':<38} {'paper acc':>9} {'our acc':>8} {'paper ×':>8} "
            f"{'our ×':>9} {'file bytes':>11} {'honest ×':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        pa = "—" if r["paper_accuracy"] is None else f"{r['paper_accuracy']:.2f}"
        pc = "—" if r["paper_compression"] is None else f"{r['paper_compression']:g}"
        lines.append(f"{r['row']:<5} {str(r['description'])[:38]:<38} {pa:>9} {r['accuracy']:>8.2f} {pc:>8} "
                     f"{r['compression']:>9.2f} {r['file_bytes']:>11,} {r['honest_compression']:>9.1f}")
    return "\n".join(lines)


# A re-measurement agrees with the recorded figure when it is within 5 of 10,000 test images:
# GPU and CPU float32 kernels round differently, which can flip a borderline image or two.
AGREEMENT = 0.05


def agrees(result: dict) -> bool:
    rec = result["recorded_accuracy"]
    return rec is not None and abs(result["accuracy"] - rec) <= AGREEMENT


def shipped_summary(result: dict) -> str:
    """The figures of a shipped model that are the same on every machine (what nbval checks)."""
    pa = "—" if result["paper_accuracy"] is None else f"{result['paper_accuracy']:.2f}%"
    pc = "—" if result["paper_compression"] is None else f"{result['paper_compression']:g}×"
    return "\n".join([
        f"row {result['row']}: {result['description']}",
        f"  accuracy   paper {pa:>8}   ours {result['recorded_accuracy']:.2f}% (final epoch, float32, "
        f"{result['test_images']} test images; re-measured from the file on the CPU: "
        f"{'agrees' if agrees(result) else 'DISAGREES'} within {AGREEMENT})",
        (f"  FLOPs reduction (FR)      paper {pc:>8}   ours {result['compression']:.2f}× "
         f"({result['base_flops']:,} → {result['flops']:,} FLOPs; params {result['base_params']:,} → "
         f"{result['params']:,}, {result['base_params'] / result['params']:.2f}×)"
         if result["compression_kind"] == "FR" else
         f"  paper-style compression   paper {pc:>8}   ours {result['compression']:.2f}× "
         f"({result['weights']:,} weights / {result['nonzeros']:,} non-zeros, {result['bits']} bits)"),
        f"  honest compression        {result['dense_fp32_bytes']:,} dense fp32 bytes / {result['file_bytes']:,} "
        f"file bytes = {result['honest_compression']:.2f}×",
        f"  FLOPs (CUP counter) {result['flops']:,} dense, {result['flops_nonzero']:,} counting only non-zero "
        f"weights; params {result['params']:,}",
    ])


def ship(model, row: str, *, smoke: bool, accuracy: float, test_images: int, ratio: float, quant=None,
         **extra) -> Path:
    """Write a row's final model as ``TrainedModels/<row>.etm`` with what its run measured; a smoke
    run writes to a temporary folder instead and never touches ``TrainedModels/``. ``quant`` (a
    ``quant.QuantSpec``) stores the weights as codes into its codebooks (``storage.save_compressed``)."""
    folder = scratch_dir(f"smoke-{row}-") if smoke else trained_models_dir()
    meta = {"row": row, "accuracy": round(accuracy, 2), "test_images": test_images, "ratio": ratio,
            "smoke": smoke, "torch": torch.__version__, **extra}
    path = folder / f"{row}.etm"
    save_compressed(model.cpu(), path, meta, quant=quant)
    return path
