"""Cheap data augmentation applied to each training batch on its device: random shifts and horizontal flips.

An MLP has no built-in translation invariance, so showing it each image moved by a pixel or two (and, for clothes or
animals, mirrored) is a strong regulariser. Every random draw comes from one ``torch.Generator``, so runs repeat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor


def augment_batch(x: Tensor, *, shift: int = 0, flip: bool = False, generator: torch.Generator) -> Tensor:
    """Flip each image left-right with probability ½ (if ``flip``), then move it by ``(dy, dx)`` pixels with ``dy, dx``
    drawn uniformly from ``[-shift, shift]``; pixels moved in from outside repeat the nearest edge pixel.

    Args:
        x: images ``(N, C, H, W)``, already normalised.
        shift: largest translation in pixels (0 for none).
        flip: random horizontal flips.
        generator: the random source; it may live on another device than ``x``.

    Returns:
        A new tensor of the shape, dtype and device of ``x`` (or ``x`` itself when there is nothing to do).
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"augment_batch: shift must be >= 0 pixels, got {shift}")
    n, c, h, w = x.shape
    if flip:
        flipped = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5  # (N,)
        x = torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)
    if shift:
        padded = TF.pad(x, (shift, shift, shift, shift), mode="replicate")  # (N, C, H + 2s, W + 2s)
        offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator, device=generator.device).to(x.device)
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H): source row of each output row
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
        index = (rows[:, :, None] * (w + 2 * shift) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        x = padded.flatten(2).gather(2, index).view(n, c, h, w)
    return x
