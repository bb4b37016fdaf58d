import io
import multiprocessing as mp
import os
import time
import urllib.error

import numpy as np
import pytest
from conftest import tiny_batches, write_archive, write_folder

from fastmbv1.errors import UserError
from pipelines import cifar10
from pipelines.cifar10 import load_cifar10


def expected_images(batches, names):
    return np.concatenate(
        [batches[n][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for n in names]
    )


@pytest.mark.parametrize("layout", ["archive", "folder", "parent-folder"])
def test_reads_both_layouts_exactly(tmp_path, layout):
    batches = tiny_batches()
    if layout == "archive":
        source = write_archive(tmp_path / "c.tar.gz", batches)
    else:
        folder = write_folder(tmp_path / "src", batches)
        source = folder if layout == "folder" else folder.parent
    data = load_cifar10(source)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    assert data.train_images.shape == (40, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (8, 32, 32, 3)
    assert data.train_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_images, expected_images(batches, train_names))
    np.testing.assert_array_equal(data.test_images, expected_images(batches, ["test_batch"]))
    assert data.test_labels.tolist() == batches["test_batch"][b"labels"]


def test_env_var_and_flag_precedence(tmp_path, monkeypatch):
    a = write_archive(tmp_path / "a.tar.gz", tiny_batches(seed=1))
    b = write_archive(tmp_path / "b.tar.gz", tiny_batches(seed=2))
    monkeypatch.setenv("FASTMBV1_DATA", str(a))
    assert load_cifar10().source == a
    assert load_cifar10(b).source == b


def test_cache_serves_second_start_and_notices_changes(tmp_path, tiny_archive, monkeypatch):
    first = load_cifar10(tiny_archive)
    calls = []
    real_decode = cifar10._decode
    monkeypatch.setattr(cifar10, "_decode", lambda s: calls.append(s) or real_decode(s))
    t = time.perf_counter()
    second = load_cifar10(tiny_archive)
    assert time.perf_counter() - t < 1.0
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(first.train_images, second.train_images)
    # A changed source must never be served from the stale cache.
    write_archive(tiny_archive, tiny_batches(seed=5))
    os.utime(tiny_archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = load_cifar10(tiny_archive)
    assert calls == [tiny_archive]
    assert not np.array_equal(third.train_images, first.train_images)


def test_cache_is_never_beside_the_source(tmp_path, tiny_archive):
    before = set(tmp_path.iterdir())
    load_cifar10(tiny_archive, cache_dir=tmp_path / "elsewhere")
    assert set(tmp_path.iterdir()) - before == {tmp_path / "elsewhere"}


def test_crash_while_caching_leaves_nothing_trusted(tmp_path, tiny_archive, monkeypatch):
    cache = tmp_path / "cache2"
    real_save = np.save
    count = []

    def dying_save(f, arr):
        count.append(1)
        if len(count) == 2:
            raise OSError(28, "No space left on device")
        real_save(f, arr)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(UserError, match="cannot write the CIFAR-10 cache"):
        load_cifar10(tiny_archive, cache_dir=cache)
    leftovers = [p for p in (cache / "arrays").rglob("*") if p.is_file()]
    assert leftovers == []
    monkeypatch.setattr(np, "save", real_save)
    assert load_cifar10(tiny_archive, cache_dir=cache).train_images.shape[0] == 40


def test_offline_without_data_says_where_it_looked(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(cifar10.urllib.request, "urlopen", no_network)
    with pytest.raises(UserError) as e:
        load_cifar10(cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "c") in msg and "--data" in msg
    assert not any((tmp_path / "c").glob("*.part"))


class FakeResponse(io.BytesIO):
    headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_download_checks_md5(tmp_path, monkeypatch):
    raw = write_archive(tmp_path / "served.tar.gz", tiny_batches()).read_bytes()
    monkeypatch.setattr(cifar10.urllib.request, "urlopen", lambda *a, **k: FakeResponse(raw))
    with pytest.raises(UserError, match="md5"):
        load_cifar10(cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    import hashlib

    monkeypatch.setattr(cifar10, "MD5", hashlib.md5(raw).hexdigest())
    data = load_cifar10(cache_dir=tmp_path / "c")
    assert data.source == tmp_path / "c" / "cifar-10-python.tar.gz"
    assert data.train_images.shape == (40, 32, 32, 3)


def corrupt(tmp_path, kind):
    batches = tiny_batches()
    if kind == "missing":
        return tmp_path / "nope.tar.gz", "does not exist"
    if kind == "truncated":
        path = write_archive(tmp_path / "t.tar.gz", batches)
        path.write_bytes(path.read_bytes()[:300])
        return path, "not a readable CIFAR-10 archive|lacks"
    if kind == "not-gzip":
        path = tmp_path / "junk.tar.gz"
        path.write_bytes(b"this is not an archive" * 10)
        return path, "not a readable CIFAR-10 archive"
    if kind == "wrong-files":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "data_batch_1").write_bytes(b"x")
        return tmp_path / "d", "data_batch_2 is missing|not a CIFAR-10 batch file"
    if kind == "wrong-kind-file":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        return path, "is not CIFAR-10"
    if kind == "bad-shape":
        batches["data_batch_3"][b"data"] = np.zeros((8, 100), np.uint8)
        return write_archive(tmp_path / "s.tar.gz", batches), r"shape \(8, 100\)"
    if kind == "bad-labels":
        batches["test_batch"][b"labels"][0] = 11
        return write_archive(tmp_path / "l.tar.gz", batches), "labels outside 0..9"
    raise AssertionError(kind)


KINDS = [
    "missing",
    "truncated",
    "not-gzip",
    "wrong-files",
    "wrong-kind-file",
    "bad-shape",
    "bad-labels",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_one_line_error(tmp_path, kind):
    path, pattern = corrupt(tmp_path, kind)
    with pytest.raises(UserError, match=pattern) as e:
        load_cifar10(path, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_real_copy_counts_and_means(real_cifar):
    d = real_cifar
    assert d.train_images.shape == (50000, 32, 32, 3)
    assert d.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(d.train_labels, minlength=10).tolist() == [5000] * 10
    assert np.bincount(d.test_labels, minlength=10).tolist() == [1000] * 10
    means = d.train_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(means, [0.49140, 0.48216, 0.44653], atol=5e-5)


def test_a_published_cache_is_kept_when_a_second_writer_finishes(tmp_path, tiny_archive):
    """Two DDP ranks decode at once; the second to finish must not remove the first's cache,
    which the first may be reading already (CI once failed a rank on exactly that)."""
    first = load_cifar10(tiny_archive, cache_dir=tmp_path / "c")
    (arrays_dir,) = (tmp_path / "c" / "arrays").iterdir()
    inode = arrays_dir.stat().st_ino
    cifar10._write_cache(cifar10._decode(tiny_archive), arrays_dir)  # the late writer
    assert arrays_dir.stat().st_ino == inode
    assert sorted(p.name for p in arrays_dir.parent.iterdir()) == [arrays_dir.name]  # no tmp
    np.testing.assert_array_equal(np.load(arrays_dir / "train_images.npy"), first.train_images)


def test_an_incomplete_cache_folder_is_named_not_removed(tmp_path, tiny_archive):
    load_cifar10(tiny_archive, cache_dir=tmp_path / "c")
    (arrays_dir,) = (tmp_path / "c" / "arrays").iterdir()
    (arrays_dir / "done").unlink()
    with pytest.raises(UserError, match="incomplete CIFAR-10 cache; delete it"):
        load_cifar10(tiny_archive, cache_dir=tmp_path / "c")
    assert (arrays_dir / "train_images.npy").is_file()


def _load_in_rounds(archive, caches, barrier):
    for cache in caches:
        barrier.wait(timeout=20)
        if load_cifar10(archive, cache_dir=cache).train_images.shape[0] != 40:
            raise SystemExit(1)


def test_ranks_that_cache_at_once_all_read_whole_arrays(tmp_path, tiny_archive):
    ctx = mp.get_context("fork")
    caches = [tmp_path / f"c{i}" for i in range(80)]
    barrier = ctx.Barrier(3)
    procs = [
        ctx.Process(target=_load_in_rounds, args=(tiny_archive, caches, barrier)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
