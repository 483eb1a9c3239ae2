"""Training samples from labelled volumes: slice clips with every dataset label as a text prompt.

Each sample is a clip of consecutive slices (1 for 2D training, several for 3D adapters) in the model's view,
with one binary target per label: labels absent from the clip are negatives for the presence score. Most
samples are centred on slices that contain a labelled structure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from .image_io import read_image
from .intensity import apply_preset, guess_modality
from .orientation import SliceView
from .vocabulary import Vocabulary

__all__ = ["SlicePromptDataset", "label_prompts"]

logger = logging.getLogger(__name__)


def label_prompts(labels: dict[int, str], vocabulary: Vocabulary) -> list[str]:
    """The text prompt of each dataset label: its vocabulary's canonical prompt, or the name as free text."""
    prompts = []
    for name in labels.values():
        resolved = vocabulary.resolve(name)
        if not resolved.known:
            logger.info("Label %r is not in the vocabulary: trained as free text", name)
        prompts.append(resolved.prompts[0])
    return prompts


class SlicePromptDataset(Dataset):
    """``num_samples`` random clips from ``items`` (``{"image": path, "label": path}``), for ``labels``.

    Returns dicts with ``image`` (clip x 3 x S x S in [-1, 1]) and ``target`` (clip x P x S x S, 0/1), P the
    number of labels, in the order of ``labels``.
    """

    def __init__(
        self,
        items: Sequence[dict[str, Any]],
        labels: dict[int, str],
        vocabulary: Vocabulary,
        image_size: int,
        num_samples: int,
        clip: int = 1,
        positive_fraction: float = 0.8,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        if not items:
            raise ValueError("No training items")
        if clip < 1:
            raise ValueError(f"clip must be >= 1, got {clip}")
        self.labels = dict(labels)
        self.image_size = image_size
        self.num_samples = num_samples
        self.clip = clip
        self.positive_fraction = positive_fraction
        self.seed = seed
        self.volumes = [self._load(item, vocabulary) for item in items]
        self.augment = (
            Compose(
                [
                    RandScaleIntensity(0.1, prob=0.5),
                    RandShiftIntensity(0.05, prob=0.5),
                    RandGaussianNoise(0.5, std=0.02),
                ]
            )
            if augment
            else None
        )

    def _load(self, item: dict[str, Any], vocabulary: Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, label = read_image(item["image"]), read_image(item["label"])
        if image.array.shape != label.array.shape:
            raise ValueError(f"{item['label']} has shape {label.array.shape}, its image {image.array.shape}")
        view = SliceView.for_volume(image)
        modality = guess_modality(image.array)
        first = next(iter(self.labels.values()))
        scaled = apply_preset(view.to_view(image.array), vocabulary.preset_for(first, modality))
        values = view.to_view(label.array).astype(np.int64)
        positive = np.flatnonzero(np.isin(values, list(self.labels)).reshape(values.shape[0], -1).any(axis=1))
        return scaled, values, positive

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Random per index, reproducible: ranks of a distributed run (disjoint indices) see different samples.
        rng = np.random.default_rng([self.seed, index])
        scaled, values, positive = self.volumes[rng.integers(len(self.volumes))]
        depth = scaled.shape[0]
        if len(positive) and rng.random() < self.positive_fraction:
            centre = int(rng.choice(positive))
        else:
            centre = int(rng.integers(depth))
        start = int(np.clip(centre - self.clip // 2, 0, max(depth - self.clip, 0)))
        rows = np.clip(np.arange(start, start + self.clip), 0, depth - 1)
        image = torch.from_numpy(np.ascontiguousarray(scaled[rows]))[:, None]  # clip x 1 x H x W
        if self.augment is not None:
            image = convert_to_tensor(self.augment(image), track_meta=False).clamp(0, 1)  # plain tensors collate
        target = torch.from_numpy(np.stack([values[rows] == value for value in self.labels], axis=1)).float()
        size = (self.image_size, self.image_size)
        image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        target = F.interpolate(target, size=size, mode="nearest")
        return {"image": (image - 0.5) / 0.5, "target": target}
