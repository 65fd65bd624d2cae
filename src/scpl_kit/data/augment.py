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

A process that reads only its share of a batch (data/share.py) augments its rows with their rows of
the draws for the whole batch (`Draws`), so each image is augmented as it is in the whole batch.
"""

from __future__ import annotations

import torch

AUGMENTATIONS: tuple[str, ...] = ("none", "weak", "strong")
PADDING = 4
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


class Draws:
    """Random draws for a batch of `total` images, of which this process holds rows `rows`: each draw is
    made for all `total` (in the same order whatever the share) and keeps this process's rows."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, total: int, rows: slice) -> None:
        self.generator, self.device, self.total, self.rows = generator, device, total, rows

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(self.total, *shape, generator=self.generator, device=self.device)[self.rows]

    def integers(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.total,), generator=self.generator, device=self.device)[self.rows]

    def uniform(self, low: float, high: float) -> torch.Tensor:
        """Draws from U[low, high), shaped to broadcast over [n, C, H, W]."""
        return (low + (high - low) * self.rand()).view(-1, 1, 1, 1)

    def coin(self, p: float) -> torch.Tensor:
        return (self.rand() < p).view(-1, 1, 1, 1)


class Augmentation:
    """Applied to a float batch [B, C, H, W] in [0, 1]; returns [views·B, C, H, W] and labels repeated to match."""

    def __init__(self, kind: str, image_size: int, hflip: bool) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r}; valid augmentations: {', '.join(AUGMENTATIONS)}")
        self.kind, self.image_size, self.hflip = kind, image_size, hflip
        self.views = 2 if kind == "strong" else 1  # the paper concatenates two strong views into the batch

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                 total: int | None = None, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` are rows `rows` of a batch of `total` (default: the whole batch)."""
        if self.kind == "none":
            return images, labels
        draws = Draws(generator, images.device, total or len(images), rows or slice(None))
        views = [self.view(images, draws) for _ in range(self.views)]
        return torch.cat(views), labels.repeat(self.views)

    def view(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        x = random_crop(images, self.image_size, draws)
        if self.hflip:
            x = torch.where(draws.coin(0.5), x.flip(-1), x)
        if self.kind == "strong":
            x = torch.where(draws.coin(0.8), color_jitter(x, draws), x)
            x = torch.where(draws.coin(0.2), grayscale(x).expand_as(x), x)
        return x


def random_crop(images: torch.Tensor, size: int, draws: Draws) -> torch.Tensor:
    """Each image's own `size`×`size` window of the image zero-padded by PADDING on every side."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (PADDING,) * 4)
    top = draws.integers(height + 2 * PADDING - size + 1)
    left = draws.integers(width + 2 * PADDING - size + 1)
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


def color_jitter(x: torch.Tensor, draws: Draws) -> torch.Tensor:
    """torchvision's ColorJitter with factors and order drawn per image: each of the four positions
    computes every adjustment for the whole batch and keeps, per image, the one its order puts there."""
    n = len(x)
    brightness, contrast, saturation, hue = JITTER
    factors = (draws.uniform(1 - brightness, 1 + brightness), draws.uniform(1 - contrast, 1 + contrast),
               draws.uniform(1 - saturation, 1 + saturation), draws.uniform(-hue, hue))
    order = draws.rand(4).argsort(dim=1)  # a uniform random permutation per image
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
