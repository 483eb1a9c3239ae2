"""Training samples from labelled volumes: slice clips with every dataset label as a text prompt.

Each sample is a clip of consecutive slices (1 for 2D training, several for 3D adapters) in the model's view,
with one binary target per label: labels absent from the clip are negatives for the presence score. Most
samples are centred on slices that contain a labelled structure.

An item may carry its own ``labels`` map (``{"1": "liver"}``), e.g. annotations that cover only some structures
or number them differently: a label the item does not annotate is marked invalid for it (``valid`` = 0), so it is
neither a positive nor a "not here" negative.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

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

__all__ = ["SlicePromptDataset", "item_labels", "label_prompts"]

logger = logging.getLogger(__name__)


def label_prompts(labels: dict[int, str], vocabulary: Vocabulary) -> list[str]:
    """The text prompt of each dataset label: its vocabulary's canonical prompt, or the name as free text."""
    prompts = []
    for name in dict.fromkeys(labels.values()):
        resolved = vocabulary.resolve(name)
        if not resolved.known:
            logger.info("Label %r is not in the vocabulary: trained as free text", name)
        prompts.append(resolved.prompts[0])
    return prompts


def item_labels(item: dict[str, Any], labels: dict[int, str]) -> dict[int, str]:
    """``{value: name}`` of one datalist item: its own ``labels`` map, else the dataset's."""
    own = item.get("labels")
    if own is None:
        return labels
    try:
        return {int(value): str(name) for value, name in own.items()}
    except (AttributeError, ValueError) as error:
        raise ValueError(f"{item.get('label')}: 'labels' must map integer values to names, got {own!r}") from error


class SlicePromptDataset(Dataset):
    """``num_samples`` random clips from ``items`` (``{"image": path, "label": path}``), for ``labels``.

    Returns dicts with ``image`` (clip x 3 x S x S in [-1, 1]), ``target`` (clip x P x S x S, 0/1) and ``valid``
    (P, 0/1: whether the item annotates that label), P the number of label names, in the order of ``labels``.
    Sample ``i`` depends only on ``seed`` and ``first_index + i``, so a resumed run (``first_index`` = samples
    already seen) continues with the samples an uninterrupted run would have drawn.
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
        first_index: int = 0,
    ) -> None:
        if not items:
            raise ValueError("No training items")
        if clip < 1:
            raise ValueError(f"clip must be >= 1, got {clip}")
        self.names = list(dict.fromkeys(labels.values()))
        self.image_size = image_size
        self.num_samples = num_samples
        self.clip = clip
        self.positive_fraction = positive_fraction
        self.seed = seed
        self.first_index = first_index
        self.volumes = [self._load(item, item_labels(item, labels), vocabulary) for item in items]
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

    def _load(self, item: dict[str, Any], labels: dict[int, str], vocabulary: Vocabulary) -> _Volume:
        if not labels:
            raise ValueError(f"{item['label']}: its 'labels' map is empty")
        unknown = sorted(set(labels.values()) - set(self.names))
        if unknown:
            raise ValueError(f"{item['label']} labels {unknown}, which are not among the training labels {self.names}")
        image, label = read_image(item["image"]), read_image(item["label"])
        if image.array.shape != label.array.shape:
            raise ValueError(f"{item['label']} has shape {label.array.shape}, its image {image.array.shape}")
        view = SliceView.for_volume(image)
        modality = guess_modality(image.array)
        scaled = apply_preset(view.to_view(image.array), vocabulary.preset_for(next(iter(labels.values())), modality))
        values = view.to_view(label.array).astype(np.int64)
        by_name: dict[str, list[int]] = {}
        for value, name in labels.items():  # two values may share a name (e.g. two Slicer segments "liver")
            by_name.setdefault(name, []).append(value)
        channels = [by_name.get(name) for name in self.names]  # None: the item does not annotate this label
        positive = np.flatnonzero(np.isin(values, list(labels)).reshape(values.shape[0], -1).any(axis=1))
        return _Volume(scaled, values, positive, channels)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Random per index, reproducible: ranks of a distributed run (disjoint indices) see different samples.
        rng = np.random.default_rng([self.seed, self.first_index + index])
        volume = self.volumes[rng.integers(len(self.volumes))]
        depth = volume.scaled.shape[0]
        if len(volume.positive) and rng.random() < self.positive_fraction:
            centre = int(rng.choice(volume.positive))
        else:
            centre = int(rng.integers(depth))
        start = int(np.clip(centre - self.clip // 2, 0, max(depth - self.clip, 0)))
        rows = np.clip(np.arange(start, start + self.clip), 0, depth - 1)
        image = torch.from_numpy(np.ascontiguousarray(volume.scaled[rows]))[:, None]  # clip x 1 x H x W
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            image = convert_to_tensor(self.augment(image), track_meta=False).clamp(0, 1)  # plain tensors collate
        slices = volume.values[rows]
        masks = [np.isin(slices, v) if v is not None else np.zeros_like(slices, bool) for v in volume.channels]
        target = torch.from_numpy(np.stack(masks, axis=1)).float()
        size = (self.image_size, self.image_size)
        image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        target = F.interpolate(target, size=size, mode="nearest")
        valid = torch.tensor([v is not None for v in volume.channels], dtype=torch.float32)
        return {"image": (image - 0.5) / 0.5, "target": target, "valid": valid}


class _Volume(NamedTuple):
    scaled: np.ndarray  # D x H x W intensities in [0, 1], in the model's view
    values: np.ndarray  # D x H x W label values
    positive: np.ndarray  # slices with any annotated structure
    channels: list[list[int] | None]  # the label values of each training label name, None where not annotated
