"""Training augmentation (methods.md §4): none, weak, or strong with two views per image."""

from __future__ import annotations

import torch

AUGMENTATIONS: tuple[str, ...] = ("none", "weak", "strong")


class Augmentation:
    """Applied to a uint8 batch [B, C, H, W]; returns [views·B, C, H, W] and labels repeated to match.

    Transforms run per image so every image gets its own random crop/flip/jitter (a v2 transform
    called on a whole batch would draw one set of parameters for all of it).
    """

    def __init__(self, kind: str, image_size: int, hflip: bool) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r}; valid augmentations: {', '.join(AUGMENTATIONS)}")
        self.kind = kind
        self.views = 2 if kind == "strong" else 1  # the paper concatenates two strong views into the batch
        if kind == "none":
            return  # torchvision's import costs a second per process; a run without augmentation skips it
        from torchvision.transforms import v2

        weak: list = [v2.RandomCrop(image_size, padding=4)] + ([v2.RandomHorizontalFlip()] if hflip else [])
        strong = weak + [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        self.transform = v2.Compose(strong if kind == "strong" else weak)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "none":
            return images, labels
        views = [torch.stack([self.transform(image) for image in images]) for _ in range(self.views)]
        return torch.cat(views), labels.repeat(self.views)
