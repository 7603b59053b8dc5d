"""Cheap data augmentation applied to each training batch on its device: random shifts, horizontal flips and random
resized crops.

An MLP has no built-in translation invariance, so showing it each image moved by a pixel or two (and, for clothes or
animals, mirrored) is a strong regulariser. A CNN on photos gains from seeing each photo framed differently: a random
part of it (a crop), stretched back to the image size. Every random draw comes from one ``torch.Generator``, so runs
repeat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor

CROP_RATIO = 4 / 3
"""The widest aspect ratio of a random crop (and ``1 / CROP_RATIO`` the tallest), as torchvision's
``RandomResizedCrop``."""


def augment_batch(x: Tensor, *, shift: int = 0, flip: bool = False, crop_scale: float = 1.0,
                  generator: torch.Generator) -> Tensor:
    """Flip each image left-right with probability ½ (if ``flip``); then either crop it (``crop_scale < 1``: see
    :func:`random_resized_crop`) or move it by ``(dy, dx)`` pixels with ``dy, dx`` drawn uniformly from
    ``[-shift, shift]``, pixels moved in from outside repeating the nearest edge pixel.

    Args:
        x: images ``(N, C, H, W)``, already normalised.
        shift: largest translation in pixels (0 for none).
        flip: random horizontal flips.
        crop_scale: the smallest share of an image's area a random crop keeps (1 for no crops).
        generator: the random source; it may live on another device than ``x``.

    Returns:
        A new tensor of the shape, dtype and device of ``x`` (or ``x`` itself when there is nothing to do).
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"augment_batch: shift must be >= 0 pixels, got {shift}")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"augment_batch: crop_scale must be in (0, 1], got {crop_scale}")
    n, c, h, w = x.shape
    if flip:
        flipped = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5  # (N,)
        x = torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)
    if crop_scale < 1:
        return random_resized_crop(x, crop_scale, generator=generator)
    if shift:
        padded = TF.pad(x, (shift, shift, shift, shift), mode="replicate")  # (N, C, H + 2s, W + 2s)
        offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator, device=generator.device).to(x.device)
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H): source row of each output row
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
        index = (rows[:, :, None] * (w + 2 * shift) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        x = padded.flatten(2).gather(2, index).view(n, c, h, w)
    return x


def random_resized_crop(x: Tensor, scale: float, *, generator: torch.Generator) -> Tensor:
    """Each image cropped to a random rectangle and stretched back to its size (bilinear): the rectangle's area is a
    share of the image drawn uniformly from ``[scale, 1]``, its aspect ratio ``r`` log-uniformly from
    ``[1 / CROP_RATIO, CROP_RATIO]`` (width ``√(area · r)``, height ``√(area / r)``, each at most the image's), and its
    place uniformly among those inside the image. Sampling near a border reflects the image.

    Args:
        x: images ``(N, C, H, W)``, already normalised; scale: the smallest share of the area, in ``(0, 1]``.
    """
    n = x.shape[0]
    draws = torch.rand(4, n, generator=generator, device=generator.device, dtype=torch.float64).to(x.device)
    area = scale + (1 - scale) * draws[0]  # (N,)
    log_ratio = (2 * draws[1] - 1) * math.log(CROP_RATIO)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1)  # as fractions of the image's sides
    height = (area / log_ratio.exp()).sqrt().clamp(max=1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=x.device)  # output grid → input, in [-1, 1] coordinates
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2] = (2 * draws[2] - 1) * (1 - width)
    theta[:, 1, 2] = (2 * draws[3] - 1) * (1 - height)
    work = torch.promote_types(x.dtype, torch.float32)  # grid sampling in at least float32 (bfloat16 training)
    grid = TF.affine_grid(theta.to(work), list(x.shape), align_corners=False)  # (N, H, W, 2)
    return TF.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(x.dtype)
