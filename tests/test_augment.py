"""Batch augmentation: random shifts that repeat the edge, and horizontal flips, reproducible from the generator."""

from __future__ import annotations

import torch

from nnbackprop.augment import augment_batch


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
