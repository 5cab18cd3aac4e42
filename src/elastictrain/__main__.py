"""Command line: ``python -m elastictrain table [--json]``, ``python -m elastictrain eval FILE`` and
``python -m elastictrain export FILE.etm OUT.onnx`` (for ONNX Runtime; see ``serving``)."""
import argparse
import json
import sys

from .evaluation import format_table, measure, shipped_models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m elastictrain", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="re-measure every model in TrainedModels/ and compare with the papers")
    t.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    t.add_argument("--dir", default=None, help="folder of .etm files (default: TrainedModels/)")
    e = sub.add_parser("eval", help="re-measure one .etm file")
    e.add_argument("file")
    e.add_argument("--json", action="store_true")
    for q in (t, e):
        q.add_argument("--device", default="cpu")
    x = sub.add_parser("export", help="write one .etm file as ONNX, checked against PyTorch in ONNX Runtime")
    x.add_argument("file")
    x.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "export":
        return export(args.file, args.out)
    files = shipped_models(args.dir) if args.cmd == "table" else [args.file]
    try:
        results = [measure(f, device=args.device) for f in files]
    except (FileNotFoundError, ValueError) as err:  # StorageError, DatasetMissingError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0


def export(file, out) -> int:
    from .serving import export_checked
    from .storage import load_compressed
    try:
        data, diff = export_checked(load_compressed(file), out)
    except (FileNotFoundError, ValueError, ImportError) as err:  # StorageError, a failed check, no onnx
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(data):,} bytes; ONNX Runtime's logits within {diff:.2g} of PyTorch's (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
