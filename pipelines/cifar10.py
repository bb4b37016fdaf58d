"""Find, download, verify, decode and cache CIFAR-10 as uint8 arrays.

Source order: an explicit path (``--data``), else ``$FASTMBV1_DATA``, else the cache folder
(``$FASTMBV1_CACHE`` or ``~/.cache/fastmbv1``), where the archive is downloaded if absent.
A local copy is checked for structure, never for the md5 of the Toronto archive: rebuilt
copies (such as the one these tests use) hold the same images in other bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmbv1.errors import UserError, one_line

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Bump when the cached layout changes, so old caches are never read with new meaning.
CACHE_VERSION = 1


@dataclass(frozen=True)
class CIFAR10:
    """Images as uint8 (N, 32, 32, 3) RGB, labels as int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTMBV1_CACHE") or Path.home() / ".cache" / "fastmbv1")


def load_cifar10(
    data: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> CIFAR10:
    """Load CIFAR-10 from ``data`` (archive or folder), ``$FASTMBV1_DATA`` or the cache.

    Decoded arrays are cached under ``cache_dir`` keyed by the source's path, size and mtime,
    so a second start memory-maps them instead of decoding the archive again.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _find_source(data, cache, download)
    key = _source_key(source)
    arrays_dir = cache / "arrays" / key
    if not (arrays_dir / "done").is_file():
        _write_cache(_decode(source), arrays_dir)
    try:
        arrays = {
            name: np.load(arrays_dir / f"{name}.npy", mmap_mode="r")
            for name in ("train_images", "train_labels", "test_images", "test_labels")
        }
    except (OSError, ValueError) as e:
        raise UserError(f"cached arrays in {arrays_dir} are unreadable ({e}); delete it") from e
    return CIFAR10(**arrays, source=source)


def _find_source(data, cache: Path, download: bool) -> Path:
    if data is None and os.environ.get("FASTMBV1_DATA"):
        data = os.environ["FASTMBV1_DATA"]
    if data is not None:
        path = Path(data).expanduser()
        if not path.exists():
            raise UserError(f"CIFAR-10 data path {path} does not exist")
        found = _source_in(path)
        if found is None:
            raise UserError(
                f"{path} is not CIFAR-10: expected {ARCHIVE_NAME} (a .tar.gz archive) "
                f"or a folder holding {FOLDER_NAME}/"
            )
        return found
    found = _source_in(cache) if cache.is_dir() else None
    if found is not None:
        return found
    if not download:
        raise UserError(
            f"CIFAR-10 not found in {cache}; pass a local copy with --data PATH "
            "or set FASTMBV1_DATA"
        )
    return _download(cache)


def _source_in(path: Path) -> Path | None:
    """The archive or batches folder that ``path`` is or directly holds, else None."""
    if path.is_file():
        return path if path.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    for candidate in (path, path / FOLDER_NAME):
        if (candidate / "data_batch_1").exists() or (candidate / "test_batch").exists():
            return candidate
    archive = path / ARCHIVE_NAME
    return archive if archive.is_file() else None


def _source_key(source: Path) -> str:
    files = [source] if source.is_file() else [source / n for n in TRAIN_FILES + TEST_FILES]
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for f in files:
        st = f.stat() if f.exists() else None
        h.update(f"{f.resolve()}:{st and st.st_size}:{st and st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _download(cache: Path) -> Path:
    from tqdm import tqdm

    target = cache / ARCHIVE_NAME
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".part", delete=False) as tmp:
            tmp_path = Path(tmp.name)
    except OSError as e:
        raise UserError(f"cannot write the CIFAR-10 download to {cache}: {e.strerror}") from e
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(URL, timeout=30) as r, open(tmp_path, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10") as bar:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError) as e:
        tmp_path.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"CIFAR-10 not found (looked in {cache}, $FASTMBV1_DATA unset, no --data) and the "
            f"download from {URL} failed ({reason}); pass a local copy with --data PATH"
        ) from e
    if md5.hexdigest() != MD5:
        tmp_path.unlink(missing_ok=True)
        raise UserError(f"downloaded {URL} has md5 {md5.hexdigest()}, expected {MD5}; retry")
    os.replace(tmp_path, target)
    return target


def _decode(source: Path) -> dict[str, np.ndarray]:
    if source.is_file():
        batches = _read_archive(source)
    else:
        batches = {}
        for name in TRAIN_FILES + TEST_FILES:
            path = source / name
            if not path.is_file():
                raise UserError(f"{path} is missing: {source} is not a complete CIFAR-10 folder")
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise UserError(f"{path} is unreadable ({e.strerror})") from e
            batches[name] = _unpickle(raw, path)
    train = [batches[n] for n in TRAIN_FILES]
    test = [batches[n] for n in TEST_FILES]
    return {
        "train_images": np.concatenate([b[0] for b in train]),
        "train_labels": np.concatenate([b[1] for b in train]),
        "test_images": np.concatenate([b[0] for b in test]),
        "test_labels": np.concatenate([b[1] for b in test]),
    }


def _read_archive(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    wanted = set(TRAIN_FILES + TEST_FILES)
    batches = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in wanted:
                    raw = tar.extractfile(member).read()
                    batches[name] = _unpickle(raw, Path(f"{path}:{member.name}"))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"{path} is not a readable CIFAR-10 archive ({one_line(e)})") from e
    missing = sorted(wanted - batches.keys())
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a complete CIFAR-10 archive")
    return batches


def _unpickle(raw: bytes, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 (N, 32, 32, 3), int64 (N,)), checked for shape and range."""
    try:
        d = pickle.load(io.BytesIO(raw), encoding="bytes")
        data, labels = d[b"data"], d[b"labels"]
        data = np.asarray(data, dtype=np.uint8) if isinstance(data, list) else data
        labels = np.asarray(labels, dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a corrupt file
        raise UserError(f"{where} is not a CIFAR-10 batch file ({type(e).__name__})") from e
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise UserError(f"{where}: data is not a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3072:
        raise UserError(f"{where}: data has shape {data.shape}, expected (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{where}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise UserError(f"{where}: labels outside 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _write_cache(arrays: dict[str, np.ndarray], arrays_dir: Path) -> None:
    """Write into a temporary sibling folder and rename it into place: all or nothing.

    A folder at ``arrays_dir`` only ever appears whole, by that rename, so one that is there
    is kept: another process (a DDP rank) published it first and may be reading it already.
    Removing it to put ours in its place is what made a rank read a half-deleted cache.
    """
    parent = arrays_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
    except OSError as e:
        raise UserError(f"cannot write the CIFAR-10 cache in {parent}: {e.strerror}") from e
    try:
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        (tmp / "done").touch()
        _publish(tmp, arrays_dir)
    except OSError as e:
        raise UserError(f"cannot write the CIFAR-10 cache in {parent}: {e.strerror}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, arrays_dir: Path) -> None:
    """Rename ``tmp`` to ``arrays_dir`` unless a complete cache is there. A rename never
    replaces a folder that holds files, so a published cache cannot be lost to a race."""
    try:
        os.rename(tmp, arrays_dir)
    except OSError:
        if (arrays_dir / "done").is_file():
            return
        # Not this code's (it publishes whole folders only): removing it could race another
        # writer's rename, so the user decides.
        raise UserError(f"{arrays_dir} holds an incomplete CIFAR-10 cache; delete it") from None
