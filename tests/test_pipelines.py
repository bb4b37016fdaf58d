"""Every pipeline that runs here, checked against what a batch must be.

The images are random uint8 in 1..255, so each is recognisable and zero fill is not image
content, and the labels are the sample indices, so every output can be traced to its source.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmbv1.errors import UserError
from pipelines import MODULES, build_pipeline, unavailable
from pipelines.sampling import MAX_SHIFT, shifts_and_flips

N = 4096
SHIFTS = range(-MAX_SHIFT, MAX_SHIFT + 1)
# Chi-square critical values at p = 0.001 for 8 (nine shifts) and 1 (flip) degrees of freedom.
CHI2_CRITICAL = {8: 26.124, 1: 10.828}


def skip_unless_available(name: str) -> pytest.MarkDecorator:
    why = unavailable(name, "cpu")
    return pytest.mark.skipif(why is not None, reason=f"{name}: {why}")


NAMES = [pytest.param(name, marks=skip_unless_available(name)) for name in MODULES]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(1234).integers(1, 256, (N, 32, 32, 3), dtype=np.uint8)
    return images, np.arange(N)


def build(name, images, labels, **kw):
    kw = {"batch_size": 512, "train": True, "device": "cpu", "seed": 7} | kw
    return build_pipeline(name, images, labels, **kw)


def epoch(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*pipeline, strict=True)
    return torch.cat(xs), torch.cat(ys)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, 32, 32) floats in [0, 1] back to the (B, 32, 32, 3) uint8 they came from."""
    return (x.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def recover(out: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, ...]:
    """The (dy, dx, flip) that turns each source into its output, or -99 where none does.

    Tries all 9 x 9 shifts of the zero-padded source against the output and its mirror.
    """
    p = MAX_SHIFT
    padded = np.pad(src, ((0, 0), (p, p), (p, p), (0, 0)))
    mirrored = out[:, :, ::-1]
    found = np.full((3, len(out)), -99)
    matches = np.zeros(len(out), dtype=int)
    for dy in SHIFTS:
        for dx in SHIFTS:
            # Output row r is source row r - dy, so the window starts at p - dy in the padding.
            shifted = padded[:, p - dy : p - dy + 32, p - dx : p - dx + 32]
            for flip, candidate in ((0, out), (1, mirrored)):
                hit = (candidate == shifted).all(axis=(1, 2, 3))
                found[:, hit] = np.array([dy, dx, flip])[:, None]
                matches += hit
    assert (matches == 1).all(), f"{(matches != 1).sum()} outputs match no single shift/flip"
    return tuple(found)


@pytest.fixture(scope="module")
def train_epoch(data):
    """One training epoch per pipeline (the slow part for torchvision), shared by tests."""
    cache = {}

    def get(name):
        if name not in cache:
            x, y = epoch(build(name, *data, drop_last=False))
            cache[name] = x, y, recover(to_uint8(x), data[0][y.numpy()])
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_every_output_is_its_source_shifted_and_maybe_flipped(name, train_epoch):
    _, y, (dy, dx, flip) = train_epoch(name)
    assert (np.abs(dy) <= MAX_SHIFT).all() and (np.abs(dx) <= MAX_SHIFT).all()
    plan = shifts_and_flips(N, seed=7, epoch=0)
    for drawn, planned in zip((dy, dx, flip), plan, strict=True):
        np.testing.assert_array_equal(drawn, planned[y.numpy()].astype(int))


@pytest.mark.parametrize(
    "alternate, translate",
    [(False, MAX_SHIFT), (True, MAX_SHIFT), (False, 2)],
    ids=["random-flips", "alternating-flips", "translate-2"],
)
def test_every_pipeline_hands_over_the_same_batches(data, alternate, translate):
    images, labels = data[0][:1000], data[1][:1000]
    batches = {}
    for name in (n for n in MODULES if unavailable(n, "cpu") is None):
        pipeline = build(
            name, images, labels, batch_size=256, alternate_flips=alternate, translate=translate
        )
        pipeline.epoch = 3
        batches[name] = epoch(pipeline)
    x_ref, y_ref = batches["torch"]
    for name, (x, y) in batches.items():
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref), f"{name} differs from torch"


@pytest.mark.parametrize("name", NAMES)
def test_a_smaller_translate_shifts_by_at_most_that(name, data):
    images, labels = data[0][:512], data[1][:512]
    x, y = epoch(build(name, images, labels, drop_last=False, translate=2))
    drawn = recover(to_uint8(x), images[y.numpy()])
    assert set(drawn[0]) == set(drawn[1]) == set(range(-2, 3))  # all of -2..2, nothing beyond
    plan = shifts_and_flips(512, seed=7, epoch=0, translate=2)
    for got, planned in zip(drawn, plan, strict=True):
        np.testing.assert_array_equal(got, planned[y.numpy()].astype(int))
    with pytest.raises(UserError, match="translate must be in 0..4"):
        build(name, images, labels, translate=5)


def test_alternating_flips_show_every_image_both_ways_in_any_two_epochs():
    plans = [shifts_and_flips(N, seed=7, epoch=e, alternate=True) for e in range(4)]
    assert abs(plans[0][2].mean() - 0.5) < 0.05
    for before, after in zip(plans, plans[1:], strict=False):
        assert (before[2] ^ after[2]).all()
    for e, plan in enumerate(plans):  # the shifts are those of random flips
        random = shifts_and_flips(N, seed=7, epoch=e)
        np.testing.assert_array_equal(plan[0], random[0])
        np.testing.assert_array_equal(plan[1], random[1])
    coins = [shifts_and_flips(N, seed=7, epoch=e)[2] for e in range(2)]
    assert 0.4 < (coins[0] ^ coins[1]).mean() < 0.6


@pytest.mark.parametrize("name", NAMES)
def test_shifts_and_flips_are_uniform(name, train_epoch):
    _, _, (dy, dx, flip) = train_epoch(name)
    for values, k in ((dy + MAX_SHIFT, 9), (dx + MAX_SHIFT, 9), (flip, 2)):
        counts = np.bincount(values, minlength=k)
        expected = len(values) / k
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < CHI2_CRITICAL[k - 1], f"counts {counts.tolist()}: chi2 {chi2:.1f}"


@pytest.mark.parametrize("name", NAMES)
def test_every_sample_once_per_epoch(name, train_epoch):
    _, y, _ = train_epoch(name)
    np.testing.assert_array_equal(np.sort(y.numpy()), np.arange(N))
    assert not np.array_equal(y.numpy(), np.arange(N)), "training order is not shuffled"


@pytest.mark.parametrize("name", NAMES)
def test_drop_last_drops_less_than_one_batch(name, data):
    images, labels = data[0][:1100], data[1][:1100]
    kept = build(name, images, labels, batch_size=256, drop_last=True)
    sizes = [len(y) for _, y in kept]
    assert len(kept) == len(sizes) == 4 and set(sizes) == {256}
    full = build(name, images, labels, batch_size=256, drop_last=False)
    assert len(full) == 5 and [len(y) for _, y in full][-1] == 1100 - 4 * 256


@pytest.mark.parametrize("name", NAMES)
def test_eval_returns_images_untouched_in_order(name, data):
    images, labels = data[0][:1000], data[1][:1000]
    x, y = epoch(build(name, images, labels, batch_size=300, train=False))
    np.testing.assert_array_equal(y.numpy(), labels)
    np.testing.assert_array_equal(to_uint8(x), images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_shape_device_layout(name, dtype, data):
    images, labels = data[0][:300], data[1][:300]
    for train in (True, False):
        p = build(name, images, labels, batch_size=128, train=train, dtype=dtype)
        for x, y in p:
            assert x.dtype == dtype and x.device.type == "cpu" and x.shape[1:] == (3, 32, 32)
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert y.dtype == torch.int64 and y.shape == (len(x),) and y.device.type == "cpu"
            assert x.min() >= 0 and x.max() <= 1
            if not train:  # within the rounding of the dtype
                exact = torch.from_numpy(images[y.numpy()]).permute(0, 3, 1, 2).float() / 255
                torch.testing.assert_close(x.float(), exact, atol=2**-8, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_and_epoch_repeat_and_epochs_differ(name, data):
    images, labels = data[0][:1024], data[1][:1024]
    a, b = build(name, images, labels), build(name, images, labels)
    a.epoch = b.epoch = 3
    xa, ya = epoch(a)
    xb, yb = epoch(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == 4
    _, y_next = epoch(a)
    assert not torch.equal(y_next, ya)


def test_torchvision_workers_change_nothing(data):
    images, labels = data[0][:512], data[1][:512]
    state = torch.random.get_rng_state()
    x0, y0 = epoch(build("torchvision", images, labels, batch_size=128))
    x2, y2 = epoch(build("torchvision", images, labels, batch_size=128, num_workers=2))
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert torch.equal(state, torch.random.get_rng_state()), "moved the caller's generator"


@skip_unless_available("dali")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("scales_in_dali", [True, False], ids=["dali-scales", "torch-scales"])
def test_dali_and_torch_are_identical(data, dtype, train, scales_in_dali, monkeypatch):
    from pipelines import dali

    # Either side scales on each device (CUDA leaves it to torch): both must hold here.
    monkeypatch.setattr(dali, "scales_in_dali", lambda device: scales_in_dali)
    images, labels = data[0][:1500], data[1][:1500]
    kw = {"train": train, "dtype": dtype, "drop_last": False, "batch_size": 128}
    # Runs of 5 batches: 12 batches are chunks of 5, 5 and 2, the last batch a short one.
    dali = build("dali", images, labels, chunk=5, **kw)
    ref = build("torch", images, labels, **kw)
    dali.epoch = ref.epoch = 5
    assert len(dali) == len(ref)
    for (x, y), (x_ref, y_ref) in zip(dali, ref, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("name", [n for n in NAMES if n.values[0] != "torchvision"])
def test_options_belong_to_torchvision(name, data):
    with pytest.raises(UserError, match=f"pipeline '{name}' has no option num_workers"):
        build(name, *data, num_workers=2)


def test_torchvision_rejects_bad_workers(data):
    with pytest.raises(UserError, match="num_workers"):
        build("torchvision", *data, num_workers=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("name", list(MODULES))
def test_cuda_without_gpu_is_a_user_error(name, data):
    assert unavailable(name, "cuda") is not None
    with pytest.raises(UserError, match="unavailable"):
        build(name, *data, device="cuda")


@pytest.mark.parametrize("name", NAMES)
def test_any_strides_and_read_only_arrays_give_the_same_batches(name, data, tmp_path):
    images, labels = np.ascontiguousarray(data[0][:300]), data[1][:300]
    # CIFAR-10's own layout is planar: NCHW seen as NHWC through a transpose is a strided view,
    # as torchvision's CIFAR10(...).data and np.concatenate of such views are.
    planar = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    strided = planar.transpose(0, 2, 3, 1)
    assert not strided.flags.c_contiguous
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    mapped = [np.load(tmp_path / f"{a}.npy", mmap_mode="r") for a in ("images", "labels")]
    frozen = images.copy()
    frozen.setflags(write=False)
    for train in (True, False):
        kw = {"batch_size": 128, "train": train, "drop_last": False}
        x_ref, y_ref = epoch(build(name, images, labels, **kw))
        for variant in ((strided, labels), mapped, (frozen, labels)):
            x, y = epoch(build(name, *variant, **kw))
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("name", NAMES)
def test_an_epoch_left_part_way_changes_no_later_epoch(name, data):
    images, labels = data[0][:1000], data[1][:1000]
    left, fresh = (build(name, images, labels, batch_size=128) for _ in range(2))
    for _ in left:  # the trainer breaks out like this when its time budget runs out
        break
    assert left.epoch == 1
    fresh.epoch = 1
    xl, yl = epoch(left)
    xf, yf = epoch(fresh)
    assert torch.equal(xl, xf) and torch.equal(yl, yf)
    batches = iter(left)  # left after two batches, then resumed from an earlier epoch
    next(batches), next(batches)
    left.epoch = fresh.epoch = 0
    xl, yl = epoch(left)
    xf, yf = epoch(fresh)
    assert torch.equal(xl, xf) and torch.equal(yl, yf)


@skip_unless_available("dali")
@pytest.mark.parametrize("chunk", [1, 2])
def test_dali_runs_the_next_chunk_while_the_caller_has_this_one(data, chunk):
    # 4 batches: runs of one batch each, or two runs of two; the next run is scheduled as
    # soon as a chunk is collected, and the last chunk's batches are handed over with none.
    p = build("dali", data[0][:1000], data[1][:1000], batch_size=256, drop_last=False, chunk=chunk)
    batches = iter(p)
    scheduled = []
    for _ in range(len(p)):
        next(batches)
        scheduled.append(p.scheduled)
    assert scheduled == {1: [1, 1, 1, 0], 2: [1, 1, 0, 0]}[chunk]
    with pytest.raises(StopIteration):
        next(batches)


@skip_unless_available("dali")
def test_dali_refuses_an_epoch_overtaken_by_another(data):
    p = build("dali", data[0][:1000], data[1][:1000], batch_size=256)
    old = iter(p)
    next(old)
    next(iter(p))
    with pytest.raises(RuntimeError, match="another epoch"):
        next(old)


@skip_unless_available("dali")
@pytest.mark.parametrize(
    ("cpus", "local_world_size", "threads"),
    [(2, None, 2), (64, None, 4), (16, "8", 2), (2, "4", 1)],
)
def test_dali_threads_are_a_share_of_the_cores(monkeypatch, cpus, local_world_size, threads):
    from pipelines import dali

    monkeypatch.setattr(dali.os, "cpu_count", lambda: cpus)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert dali.num_threads() == threads
