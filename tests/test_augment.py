import pytest
import torch
import torch.nn as nn

from fastmbv1.augment import cutout, mix, mixed_loss


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    # Distinct labels 0..n-1 make y_b the permutation itself.
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    return x, torch.arange(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a 2-D mask that must be exactly one filled rectangle."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    top, bottom = int(rows.min()), int(rows.max()) + 1
    left, right = int(cols.min()), int(cols.max()) + 1
    assert mask[top:bottom, left:right].all()
    assert int(mask.sum()) == (bottom - top) * (right - left)
    return top, bottom, left, right


def test_no_mixing_passes_the_batch_through():
    x, y = batch()
    xm, ya, yb, lam = mix(x, y, mixup=0.0, cutmix=0.0, generator=gen(0))
    assert xm is x and ya is y and yb is y and lam == 1.0


def test_mixup_is_the_documented_convex_combination():
    x, y = batch()
    x_before = x.clone()
    xm, ya, yb, lam = mix(x, y, mixup=1.0, cutmix=0.0, generator=gen(1))
    perm = yb
    assert torch.equal(ya, y) and sorted(perm.tolist()) == y.tolist()
    assert 0.0 < lam < 1.0
    assert torch.equal(xm, lam * x + (1 - lam) * x[perm])
    assert torch.equal(x, x_before)  # the caller's batch is untouched


def test_mix_replays_with_the_same_seed():
    x, y = batch()
    a = mix(x, y, mixup=1.0, cutmix=1.0, generator=gen(7))
    b = mix(x, y, mixup=1.0, cutmix=1.0, generator=gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and a[3] == b[3]


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_pastes_one_box_and_lam_is_its_complement(seed):
    x, y = batch()
    xm, ya, perm, lam = mix(x, y, mixup=0.0, cutmix=1.0, generator=gen(seed))
    assert torch.equal(ya, y)
    changed = (xm != x).any(0).any(0)
    if not changed.any():  # a box clipped to nothing (or a pure fixed-point perm)
        assert lam == 1.0 or torch.equal(perm, y)
        return
    top, bottom, left, right = box(changed)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(xm[..., inside], x[perm][..., inside])
    assert torch.equal(xm[..., ~inside], x[..., ~inside])
    assert lam == 1 - (bottom - top) * (right - left) / 1024


def test_both_alphas_use_each_method_on_some_batches():
    x, y = batch()
    seen = set()
    for seed in range(20):
        xm, _, perm, lam = mix(x, y, mixup=1.0, cutmix=1.0, generator=gen(seed))
        from_a_or_b = ((xm == x) | (xm == x[perm])).all()
        seen.add("cutmix" if from_a_or_b else "mixup")
    assert seen == {"cutmix", "mixup"}


def test_mixed_loss_is_the_weighted_sum():
    logits = torch.randn(8, 10, generator=gen(2))
    ya, yb = torch.arange(8), torch.arange(8).flip(0)
    ce = nn.CrossEntropyLoss()
    expected = 0.3 * ce(logits, ya) + 0.7 * ce(logits, yb)
    assert torch.equal(mixed_loss(ce, logits, ya, yb, 0.3), expected)
    assert torch.equal(mixed_loss(ce, logits, ya, ya, 1.0), ce(logits, ya))
    # A captured CUDA graph passes lambda as a device tensor, filled in place each step: it
    # must never be read on the host (on a GPU that waits for the device, and breaks capture).
    for lam, y_b, want in ((0.3, yb, expected), (1.0, ya, ce(logits, ya))):
        device_lam = torch.tensor(lam).as_subclass(NoHostReads)
        got = mixed_loss(ce, logits, ya, y_b, device_lam).as_subclass(torch.Tensor)
        torch.testing.assert_close(got, want)


class NoHostReads(torch.Tensor):
    """A tensor that fails the test where its value would be read on the host."""

    def __bool__(self):
        raise AssertionError("read on the host")


@pytest.mark.parametrize("size", [8, 5])
def test_cutout_zeros_one_clipped_square_per_sample(size):
    x = torch.rand(256, 3, 32, 32, generator=gen(3)) + 0.5  # no zeros of its own
    out = cutout(x, size, gen(4))
    zero = out == 0
    assert torch.equal(zero.all(1), zero.any(1))  # the same pixels in every channel
    assert torch.equal(out[~zero], x[~zero])
    clipped = 0
    for mask in zero[:, 0]:
        top, bottom, left, right = box(mask)
        for lo, hi in ((top, bottom), (left, right)):
            if lo == 0 or hi == 32:
                clipped += hi - lo < size
                assert hi - lo <= size
            else:
                assert hi - lo == size
    assert clipped > 0  # centres near the border were drawn, and cut short


def test_cutout_is_reproducible_and_off_at_zero():
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(cutout(x, 8, gen(5)), cutout(x, 8, gen(5)))
    assert cutout(x, 0, gen(5)) is x


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_cutout_and_mixing_keep_the_batch_layout(layout):
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=layout)
    assert cutout(x, 8, gen(6)).is_contiguous(memory_format=layout)
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0)):
        xm = mix(x, torch.arange(8), mixup=mixup, cutmix=cutmix, generator=gen(7))[0]
        assert xm.is_contiguous(memory_format=layout)


def test_progressive_resizing_grows_to_full_size_half_way():
    from fastmbv1.augment import augment_batch, side_at
    from fastmbv1.plan import make_config

    assert [side_at(16, p) for p in (0.0, 0.1, 0.25, 0.4, 0.5, 0.9)] == [
        16,
        19 // 4 * 4,
        24,
        28,
        32,
        32,
    ]
    assert side_at(32, 0.0) == 32
    x, y = batch()
    small = augment_batch(x, y, make_config({"preset": "cpu"}), gen(8), side=24)[0]
    assert small.shape == (8, 3, 24, 24)
