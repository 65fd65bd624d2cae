"""Training augmentation (methods.md §4): none, weak, or strong with two views per image, batched on
tensors on the training device.

The transforms are torchvision's, applied to a whole batch at once with parameters drawn per image
(a v2 transform called on a batch draws one set for all of it, and one call per image is what kept a
GPU waiting: ~0.9k strong views/s per CPU core):

    weak     RandomCrop(size, padding=4) (zero padding), RandomHorizontalFlip(0.5) when the data allows flips
    strong   weak, then ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8 (its four adjustments in a
             random order per image), then RandomGrayscale(0.2)

Images are floats in [0, 1] here (no rounding back to uint8 between steps, which torchvision does on
uint8 input). `tests/test_data.py` compares the batch statistics with torchvision's per-image transforms.
"""

from __future__ import annotations

import torch

AUGMENTATIONS: tuple[str, ...] = ("none", "weak", "strong")
PADDING = 4
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


class Augmentation:
    """Applied to a float batch [B, C, H, W] in [0, 1]; returns [views·B, C, H, W] and labels repeated to match."""

    def __init__(self, kind: str, image_size: int, hflip: bool) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r}; valid augmentations: {', '.join(AUGMENTATIONS)}")
        self.kind, self.image_size, self.hflip = kind, image_size, hflip
        self.views = 2 if kind == "strong" else 1  # the paper concatenates two strong views into the batch

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "none":
            return images, labels
        views = [self.view(images, generator) for _ in range(self.views)]
        return torch.cat(views), labels.repeat(self.views)

    def view(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = random_crop(images, self.image_size, generator)
        if self.hflip:
            x = torch.where(coin(len(x), 0.5, generator, x.device), x.flip(-1), x)
        if self.kind == "strong":
            x = torch.where(coin(len(x), 0.8, generator, x.device), color_jitter(x, generator), x)
            x = torch.where(coin(len(x), 0.2, generator, x.device), grayscale(x).expand_as(x), x)
        return x


def uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n draws from U[low, high), shaped to broadcast over [n, C, H, W]."""
    return (low + (high - low) * torch.rand(n, generator=generator, device=device)).view(n, 1, 1, 1)


def coin(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device) < p).view(n, 1, 1, 1)


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Each image's own `size`×`size` window of the image zero-padded by PADDING on every side."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (PADDING,) * 4)
    top = torch.randint(0, height + 2 * PADDING - size + 1, (n,), generator=generator, device=images.device)
    left = torch.randint(0, width + 2 * PADDING - size + 1, (n,), generator=generator, device=images.device)
    steps = torch.arange(size, device=images.device)
    rows, cols = (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None, :]  # [n, size, 1], [n, 1, size]
    picked = padded[torch.arange(n, device=images.device)[:, None, None], :, rows, cols]  # [n, size, size, C]
    return picked.permute(0, 3, 1, 2)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n, 1, H, W] luma of RGB (a single-channel image is its own)."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """torchvision's ColorJitter with factors and order drawn per image: each of the four positions
    computes every adjustment for the whole batch and keeps, per image, the one its order puts there."""
    n, device = len(x), x.device
    brightness, contrast, saturation, hue = JITTER
    factors = (uniform(n, 1 - brightness, 1 + brightness, generator, device), uniform(n, 1 - contrast, 1 + contrast, generator, device),
               uniform(n, 1 - saturation, 1 + saturation, generator, device), uniform(n, -hue, hue, generator, device))
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)  # a uniform random permutation per image
    adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for position in range(4):
        chosen = order[:, position].view(n, 1, 1, 1)
        x = sum(torch.where(chosen == op, adjust[op](x, factors[op]), 0.0) for op in range(4))
    return x


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (RGB → HSV → RGB); a single-channel image has no hue."""
    if x.shape[1] == 1:
        return x
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb(torch.remainder(h + shift[:, 0], 1.0), s, v)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in turns [0, 1), saturation, value; each [n, H, W]."""
    r, g, b = x.unbind(1)
    high, low = x.max(1).values, x.min(1).values
    spread = high - low
    gray = spread == 0
    saturation = spread / torch.where(high == 0, 1.0, high)
    safe = torch.where(gray, 1.0, spread)
    hue = torch.where(high == r, (g - b) / safe, torch.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(gray, 0.0, torch.remainder(hue / 6, 1.0))
    return hue, saturation, high


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    sector = sector.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Per sector (0…5) of the hue circle, which of v, t, p, q each channel takes.
    r = torch.stack((v, q, p, p, t, v), 1)
    g = torch.stack((t, v, v, q, p, p), 1)
    b = torch.stack((p, p, t, v, v, q), 1)
    index = sector[:, None]
    return torch.cat([c.gather(1, index) for c in (r, g, b)], 1).clamp(0, 1)
