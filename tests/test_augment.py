"""Batch augmentation: random shifts that repeat the edge, and horizontal flips, reproducible from the generator."""

from __future__ import annotations

import pytest
import torch

from nnbackprop.augment import augment_batch, random_resized_crop


def test_augment_shift_moves_images_and_repeats():
    x = torch.arange(2 * 3 * 7 * 7, dtype=torch.float32).view(2, 3, 7, 7)
    out = augment_batch(x, shift=2, generator=torch.Generator().manual_seed(0))
    again = augment_batch(x, shift=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    for image, moved in zip(x, out):  # each output is the input translated by one (dy, dx) in [-2, 2]^2
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(moved[:, 2:5, 2:5], image[:, 2 + dy:5 + dy, 2 + dx:5 + dx])]
        assert len(matches) == 1
    assert augment_batch(x, generator=torch.Generator()) is x


def test_augment_flip_mirrors_about_half_the_images():
    x = torch.randn(400, 1, 4, 5)
    out = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ unchanged).all()) and 150 < int(flipped.sum()) < 250


def test_random_resized_crops_repeat_keep_the_shape_and_stay_inside_the_image():
    """Crops magnify a part of each image (bilinear, reflecting at the border): values within the image's range, the
    same shape and dtype (bfloat16 too), drawn from the generator alone."""
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    out = augment_batch(x, crop_scale=0.5, generator=torch.Generator().manual_seed(0))
    again = augment_batch(x, crop_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out, again)
    assert not torch.equal(out, x) and x.min() <= out.min() and out.max() <= x.max()
    assert torch.equal(random_resized_crop(x, 0.5, generator=torch.Generator().manual_seed(0)), out)  # no flip asked
    half = augment_batch(x.bfloat16(), crop_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert half.dtype == torch.bfloat16


def test_crop_scale_out_of_range_is_refused():
    with pytest.raises(ValueError, match="crop_scale must be in"):
        augment_batch(torch.zeros(1, 1, 4, 4), crop_scale=0.0, generator=torch.Generator())
