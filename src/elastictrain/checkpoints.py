"""Checkpoints: atomic saving, safe checked loading, a checksum MANIFEST, fetching.

A checkpoint is a plain dict read by ``torch.load(weights_only=True)`` (no pickled code runs) that
holds ``model.arch``, so the model is rebuilt from the file alone. A bad file raises
CheckpointError, whose message names the file and the fix."""
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

FORMAT, VERSION = "elastictrain-checkpoint", 1
_PRODUCER = "notebooks/00_dense_baselines.ipynb"
_CHUNK = 1 << 20
# Below this much free space a failed write is reported as a full disk: torch.save then fails with
# "[enforce fail at inline_container.cc] unexpected pos ...", which names no cause.
_NEARLY_FULL = 64 << 20
# What torch's weights_only unpickler accepts besides tensors and containers (optimizer and
# scheduler state use some of these, e.g. MultiStepLR keeps its milestones in a Counter).
_ATOMS = (bool, int, float, complex, str, bytes, torch.Size, torch.device, torch.dtype)
MANIFEST_HEADER = """\
# sha256 of the (git-ignored) checkpoint files in this folder, one line per file:
#   <sha256, 64 hex digits>  <file name>  <download url, or - if not hosted>  [# producing notebook]
# load_checkpoint() refuses a listed file whose sha256 differs; fetch() verifies downloads.
# Add or update entries with elastictrain.checkpoints.record_in_manifest(path, url).
"""


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, foreign or does not fit; the message says the fix."""


def checkpoints_dir() -> Path:
    """The checkpoints folder: $ELASTICTRAIN_CHECKPOINTS, else the nearest ``checkpoints/`` at or
    above the working directory, else the one in this package's repository."""
    if os.environ.get("ELASTICTRAIN_CHECKPOINTS"):
        return Path(os.environ["ELASTICTRAIN_CHECKPOINTS"])
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "checkpoints").is_dir():
            return d / "checkpoints"
    return Path(__file__).resolve().parents[2] / "checkpoints"


_SCRATCH_ENV = "ELASTICTRAIN_SCRATCH"
_scratch_owned = []  # the TemporaryDirectory objects this process made: each goes at exit


def scratch_root() -> Path:
    """The temporary folder of smoke runs' files: the first process to ask creates it and removes it
    when it exits; processes it starts afterwards (notebook kernels, spawned rows) inherit it through
    the environment and leave its removal to it. Smoke files are never reused, and a VGG16 one weighs
    59 MB: left in /tmp, one `make test` leaked ~1.5 GB (1.3 GB of it notebooks 17-19's ResNets)."""
    root = os.environ.get(_SCRATCH_ENV)
    if not (root and os.path.isdir(root)):
        _scratch_owned.append(tempfile.TemporaryDirectory(prefix="elastictrain-smoke-"))
        root = os.environ[_SCRATCH_ENV] = _scratch_owned[-1].name
    return Path(root)


def scratch_dir(prefix: str) -> Path:
    """A new folder in ``scratch_root()``."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))


def atomic_write(path: Path, write) -> None:
    """``write(file)`` to a temp file beside ``path``, fsync, rename over ``path``; any exception
    (even KeyboardInterrupt) leaves ``path`` as it was and removes the temp file. A write that fails
    on a nearly full disk raises OSError(ENOSPC) saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL rather than mkstemp: the umask, not 0600, then sets the final file's permissions.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        free = shutil.disk_usage(path.parent).free  # before the temp file's bytes are given back
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and free < _NEARLY_FULL:
            raise OSError(errno.ENOSPC, f"writing {path} failed with {free / 2**20:.0f} MiB left on its disk "
                          f"({type(e).__name__}: {e}); free some space and run again (the previous "
                          "file, if any, is intact)") from e
        raise


def _portable(obj, where: str, lists: bool = False):
    """Copy ``obj`` so weights_only loading can read it (tensors to CPU), else TypeError. Types
    are checked exactly: numpy scalars subclass float/int but would unpickle as numpy objects."""
    t = type(obj)
    if obj is None or t in _ATOMS:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if t in (list, tuple, set):
        items = [_portable(v, f"{where}[{i}]", lists) for i, v in enumerate(obj)]
        return items if t is list or (lists and t is tuple) else t(items)
    if t in (dict, OrderedDict, Counter):
        out = t()
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has key {k!r} of type {type(k).__name__}; use str keys")
            out[k] = _portable(v, f"{where}[{k!r}]", lists)
        if hasattr(obj, "_metadata"):  # state_dict versions, which load_state_dict relies on
            out._metadata = _portable(obj._metadata, f"{where}._metadata")
        return out
    raise TypeError(f"{where} is a {t.__module__}.{t.__qualname__}, which torch.load(weights_only="
                    "True) cannot read; store None, bool, int, float, str, tensors, or lists/dicts "
                    "of these (e.g. float(x) or x.item() for numpy scalars)")


def save_checkpoint(path, model: nn.Module, *, epoch=None, optimizer=None, scheduler=None,
                    extra=None) -> str:
    """Atomically write ``model`` (from create_model) and training state to ``path``.

    Args:
        epoch, optimizer, scheduler: Optional; optimizer/scheduler are stored as state_dicts.
        extra: Optional dict of None/bool/int/float/str/tensors and lists/dicts of these.

    Returns:
        The file's sha256. TypeError (naming the key) if a value is not weights_only-loadable.
    """
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        raise TypeError("model has no .arch; build it with elastictrain.models.create_model")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    # Everything is validated before the disk is touched, so a bad value costs no partial write.
    payload = {"format": FORMAT, "version": VERSION,
               "arch": {"name": str(arch["name"]),
                        "kwargs": _portable(dict(arch.get("kwargs", {})), "arch['kwargs']", True)},
               "state_dict": _portable(model.state_dict(), "state_dict"),
               "epoch": _portable(epoch, "epoch"),
               "optimizer": None if optimizer is None else _portable(optimizer.state_dict(),
                                                                     "optimizer"),
               "scheduler": None if scheduler is None else _portable(scheduler.state_dict(),
                                                                     "scheduler"),
               "extra": _portable(dict(extra or {}), "extra")}
    atomic_write(Path(path), lambda f: torch.save(payload, f))
    return sha256_file(path)


def _check_zip(path: Path) -> bool:
    """Read every member of a zip-format file so its CRC32 is checked (torch.load does not, and
    silently returns flipped bits in tensors); True if every member had a CRC and passed."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return False  # not a zip (legacy torch format or garbage): torch.load will judge it
    with zipfile.ZipFile(path) as zf:
        for info in (infos := zf.infolist()):
            with zf.open(info) as member:  # raises BadZipFile on a CRC mismatch
                while member.read(_CHUNK):
                    pass
    return all(info.CRC for info in infos)  # CRC 0: the writer skipped CRCs (torch can)


def load_checkpoint(path, *, expected_arch=None, map_location="cpu") -> dict:
    """Load a ``save_checkpoint`` file, checking integrity, format, MANIFEST sha256 and arch.

    Args:
        expected_arch: Optional model name, or an arch dict like ``model.arch`` (name and kwargs
            must then both match).

    Returns:
        The dict. CheckpointError: missing, damaged, foreign, checksum or arch mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run {_PRODUCER} or "
                              f"download it with elastictrain.checkpoints.fetch({path.name!r})")
    verify(path)  # before parsing anything, so a tampered file is never unpickled
    def damaged(e):
        return CheckpointError(f"{path}: is truncated or corrupted ({type(e).__name__}: {e}); "
                               "delete it and re-download or retrain")

    try:
        intact = _check_zip(path)
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot be read ({e}); fix its permissions") from e
    except Exception as e:  # noqa: BLE001 - damaged zips raise BadZipFile, EOFError, OSError, ...
        raise damaged(e) from e
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - bad bytes raise many types (truncation: even OSError)
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path}: refused: it holds objects that safe (weights_only) "
                                  "loading forbids, so save_checkpoint did not write it; never "
                                  "load it with weights_only=False unless you trust it") from e
        if intact:  # every byte passed its CRC: never advise deleting a good file (e.g. for OOM
            raise CheckpointError(  # or map_location="cuda" on a machine without a GPU)
                f"{path}: is intact but torch.load failed ({type(e).__name__}: {e}); check "
                "map_location, memory and the torch version; do not delete it") from e
        raise damaged(e) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        if isinstance(ckpt, dict) and "model_state_dict" in ckpt:
            raise CheckpointError(f"{path}: is an original ElasticTrain checkpoint "
                                  "('model_state_dict'); such files are imported with the "
                                  "dedicated ElasticTrain importer, not load_checkpoint()")
        what = ("a bare state_dict" if isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}")
        raise CheckpointError(f"{path}: is not an elastictrain checkpoint (it holds {what}); load "
                              "the weights into a model from create_model() and save that with "
                              "elastictrain.checkpoints.save_checkpoint()")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: is checkpoint version {ckpt.get('version')!r}, this code "
                              f"reads version {VERSION}; use a matching elastictrain")
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("kwargs"), dict):
        raise CheckpointError(f"{path}: has a malformed 'arch'; re-create it with save_checkpoint")
    if expected_arch is not None:
        want = {"name": expected_arch} if isinstance(expected_arch, str) else {
            "name": expected_arch["name"],
            "kwargs": _portable(dict(expected_arch.get("kwargs", {})), "expected_arch", True)}
        have = {k: arch[k] for k in want}  # a bare name compares the name only
        if want != have:
            raise CheckpointError(f"{path}: holds architecture {have}, but {want} was expected; "
                                  "pass the right file or the right expected_arch")
    return ckpt


def build_from_checkpoint(path, **kw) -> tuple[nn.Module, dict]:
    """Rebuild the model in ``path`` with ``create_model`` and load its weights strictly.

    ``**kw`` goes to ``load_checkpoint``. Returns ``(model, checkpoint_dict)``, the model in train
    mode as create_model gives it. Raises CheckpointError as load_checkpoint does, or when the
    weights do not fit the architecture (listing up to 5 offending keys).
    """
    from elastictrain.models import create_model
    ckpt = load_checkpoint(path, **kw)
    name, kwargs, sd = ckpt["arch"]["name"], ckpt["arch"]["kwargs"], ckpt["state_dict"]
    try:
        model = create_model(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build {name}(**{kwargs}) ({e}); use an elastictrain "
                              "version that has this model") from e
    own = model.state_dict()
    bad = ([f"missing {k}" for k in own if k not in sd]
           + [f"unexpected {k}" for k in sd if k not in own]
           + [f"{k}: file {tuple(getattr(sd[k], 'shape', ()))} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and getattr(sd[k], "shape", None) != own[k].shape])
    try:
        if bad:
            raise RuntimeError("; ".join(bad[:5]) + (f"; +{len(bad) - 5} more" * (len(bad) > 5)))
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {name}(**{kwargs}): {e}; the file is "
                              "inconsistent, re-create it with save_checkpoint()") from e
    return model, ckpt


def sha256_file(path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entries(manifest=None) -> dict[str, tuple[str, str, str]]:
    """{name: (sha256, url, note)} of a MANIFEST; {} if it does not exist."""
    manifest = Path(manifest) if manifest else checkpoints_dir() / "MANIFEST"
    entries = {}
    for n, line in enumerate(manifest.read_text().splitlines() if manifest.is_file() else [], 1):
        body, _, note = line.partition("#")
        if not (fields := body.split()):
            continue
        if len(fields) != 3 or len(fields[0]) != 64 or set(fields[0].lower()) - set(
                "0123456789abcdef"):
            raise CheckpointError(f"{manifest}:{n}: expected '<sha256>  <file name>  <url or ->', "
                                  f"got {line!r}; fix or remove that line")
        if fields[1] in entries:
            raise CheckpointError(f"{manifest}:{n}: {fields[1]} is listed twice; keep one entry")
        entries[fields[1]] = (fields[0].lower(), fields[2], note.strip())
    return entries


def read_manifest(path=None) -> dict[str, tuple[str, str]]:
    """Parse a MANIFEST (default ``checkpoints_dir()/"MANIFEST"``) into ``{name: (sha256, url)}``
    (url ``"-"``: not hosted; ``{}`` if missing). A malformed/duplicate line: CheckpointError."""
    return {k: v[:2] for k, v in _entries(path).items()}


def record_in_manifest(file_path, url="-", manifest=None, *, note=None) -> str:
    """Add or replace (atomically) the MANIFEST entry for ``file_path``'s name; returns its sha256.

    Args:
        url: Where the file can be downloaded, or ``"-"`` if it is not hosted.
        manifest: Default ``checkpoints_dir()/"MANIFEST"``; created if missing, else its other
            lines are kept.
        note: Notebook/command that produces the file (default: keep the entry's current note).
    """
    manifest = Path(manifest) if manifest else checkpoints_dir() / "MANIFEST"
    name, digest = Path(file_path).name, sha256_file(file_path)
    if any(c.isspace() or c == "#" for c in name + url):
        raise ValueError(f"{name!r}, {url!r}: MANIFEST names and urls cannot hold spaces or '#'")
    note = note if note is not None else _entries(manifest).get(name, ("", "", ""))[2]
    entry = f"{digest}  {name}  {url}" + (f"  # {note}" if note else "")
    lines = (manifest.read_text() if manifest.is_file() else MANIFEST_HEADER).splitlines()
    at = [i for i, ln in enumerate(lines) if ln.partition("#")[0].split()[1:2] == [name]]
    if at:
        lines[at[0]] = entry
    else:
        lines.append(entry)
    atomic_write(manifest, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return digest


def verify(path) -> bool:
    """Check a file against the MANIFEST entry of its name: True if it matches, False if the name
    is not listed; CheckpointError if the sha256 differs."""
    path = Path(path)
    if (listed := read_manifest().get(path.name)) is None:
        return False
    if (actual := sha256_file(path)) != listed[0]:
        raise CheckpointError(
            f"{path}: sha256 {actual} does not match {listed[0]} in {checkpoints_dir()/'MANIFEST'}"
            f"; delete it and re-download (elastictrain.checkpoints.fetch({path.name!r})) or "
            "retrain, or if you regenerated it on purpose, update it with record_in_manifest()")
    return True


def fetch(name: str, *, dest_dir=None, url=None) -> Path:
    """Return the local checkpoint ``name`` (a bare file name), downloading it if missing.

    The URL is ``url``, else the MANIFEST's, else ``$ELASTICTRAIN_CHECKPOINT_MIRROR/<name>``. The
    download's full sha256 is checked against the MANIFEST before it is moved into place; a
    mismatch deletes it and leaves any existing file untouched.

    Args:
        dest_dir: Target folder (default ``checkpoints_dir()``).

    Raises:
        CheckpointError: Name not in the MANIFEST, no source, download failed, sha256 mismatch.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"fetch() takes a bare file name, got {name!r}")
    target = Path(dest_dir or checkpoints_dir()) / name
    if target.is_file():
        verify(target)
        return target
    listed_sha, listed_url, note = _entries().get(name, (None, "-", ""))
    mirror = os.environ.get("ELASTICTRAIN_CHECKPOINT_MIRROR")
    url = url or (listed_url if listed_url != "-" else None) or (
        mirror and f"{mirror.rstrip('/')}/{urllib.parse.quote(name)}")
    if not url:
        where = "is listed with url '-'" if listed_sha else "is not in the MANIFEST"
        raise CheckpointError(f"{target}: missing, and {name} {where}: no public copy is hosted; "
                              f"it is produced by {note or _PRODUCER} (or set "
                              "ELASTICTRAIN_CHECKPOINT_MIRROR to a mirror that has it)")
    if not listed_sha:  # a download that cannot be verified is not reproducible
        raise CheckpointError(f"{target}: no sha256 for {name} in {checkpoints_dir()/'MANIFEST'}, "
                              "so a download cannot be verified; add its entry there first")

    def download(f):
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as r:
            while chunk := r.read(_CHUNK):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != listed_sha:  # raising here makes atomic_write drop the temp file
            raise CheckpointError(f"{target}: download from {url} has sha256 {h.hexdigest()}, "
                                  f"expected {listed_sha}; nothing was kept: check the URL/mirror "
                                  "and the MANIFEST entry")

    try:
        atomic_write(target, download)
    except OSError as e:  # urllib.error.URLError is an OSError
        raise CheckpointError(f"{target}: could not download {url} ({e}); check the URL and "
                              "network, or set ELASTICTRAIN_CHECKPOINT_MIRROR") from e
    return target
