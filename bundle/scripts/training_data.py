"""Training samples from labelled volumes: slice clips with every dataset label as a text prompt.

Each sample is a clip of consecutive slices in the model's view (1 for 2D training, several for 3D adapters and
the tracker's clips), with one binary target per label: labels absent from the clip are negatives for the presence
score. Most samples start on, or are centred on, slices that contain a labelled structure.

An item may carry its own ``labels`` map (``{"1": "liver"}``), e.g. annotations that cover only some structures
or number them differently: a label the item does not annotate is marked invalid for it (``valid`` = 0), so it is
neither a positive nor a "not here" negative.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from .image_writing import read_labelled
from .intensity import guess_modality
from .label_numbering import item_labels
from .orientation import SliceView
from .slices import prepare_slices, preset_for
from .vocabulary import Vocabulary

__all__ = ["SlicePromptDataset", "batch_prompts", "label_prompts", "per_query"]

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


class SlicePromptDataset(Dataset):
    """``num_samples`` random clips from ``items`` (``{"image": path, "label": path}``), for ``labels``.

    Returns dicts with ``image`` (clip x 3 x S x S in [-1, 1]), ``target`` (clip x P x S x S, 0/1), ``valid``
    (P, 0/1: whether the sample trains that label's text prompt) and ``annotated`` (P, 0/1: whether the item
    annotates the label, so its target is true, whatever the preset: the clicks train on it), P the number of label
    names, in the order of ``labels``. With ``absent`` (labels known to be in no training image, e.g. the rest of
    the vocabulary for phantoms), ``absent`` holds the indices of ``negatives_per_sample`` of them drawn for the
    sample, or -1 for the ``1 - negative_fraction`` of samples that draw none: their text prompts learn to say "not
    here", which is what lets inference skip absent labels' masks. Each extra prompt costs a pass of the heads, so a
    fraction below 1 buys the negatives at a fraction of their price (:func:`batch_prompts` shares them).

    Each sample is prepared with one intensity preset (:func:`scripts.slices.preset_for`, as inference prepares a
    label's slices), drawn among the presets of the item's labels; labels with another preset are not valid for
    that sample. With ``anchor_first`` the clip starts on a slice showing a structure and runs up or down the
    volume at random (the tracker's clips, prompted on their first slice); otherwise it is centred on such a slice.
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
        anchor_first: bool = False,
        positive_fraction: float = 0.8,
        absent: Sequence[str] = (),
        negatives_per_sample: int = 2,
        negative_fraction: float = 1.0,
        augment: bool = True,
        seed: int = 0,
        first_index: int = 0,
    ) -> None:
        if not items:
            raise ValueError("No training items")
        if clip < 1:
            raise ValueError(f"clip must be >= 1, got {clip}")
        self.names = list(dict.fromkeys(labels.values()))
        clash = sorted({vocabulary.resolve(n).name for n in absent} & {vocabulary.resolve(n).name for n in self.names})
        if clash:
            raise ValueError(f"absent_labels {clash} are also training labels: a label cannot be both")
        if absent and negatives_per_sample < 1:
            raise ValueError(f"negatives_per_sample must be >= 1 with absent_labels, got {negatives_per_sample}")
        if absent and not 0 < negative_fraction <= 1:
            raise ValueError(f"negative_fraction must be in (0, 1] with absent_labels, got {negative_fraction}")
        self.absent = list(dict.fromkeys(absent))
        self.negatives = min(negatives_per_sample, len(self.absent))
        self.negative_fraction = negative_fraction
        self.image_size = image_size
        self.num_samples = num_samples
        self.clip = clip
        self.anchor_first = anchor_first
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
        if "label" not in item:
            raise ValueError(f"Training item {item['image']} has no 'label' map to learn from")
        if not labels:
            raise ValueError(f"{item['label']}: its 'labels' map is empty")
        unknown = sorted(set(labels.values()) - set(self.names))
        if unknown:
            raise ValueError(f"{item['label']} labels {unknown}, which are not among the training labels {self.names}")
        image, label = read_labelled(item["image"], item["label"])
        view = SliceView.for_volume(image)
        modality = guess_modality(image.array)
        values = view.to_view(label.array).astype(np.int64)
        by_name: dict[str, list[int]] = {}
        for value, name in labels.items():  # two values may share a name (e.g. two Slicer segments "liver")
            by_name.setdefault(name, []).append(value)
        channels = [by_name.get(name) for name in self.names]  # None: the item does not annotate this label
        presets: dict[str, int] = {}  # preset (as JSON) -> group index
        groups, group_of = [], []
        for name, channel in zip(self.names, channels, strict=True):
            if channel is None:
                group_of.append(None)
                continue
            preset = preset_for(image, vocabulary, vocabulary.resolve(name), modality)
            key = json.dumps(preset, sort_keys=True)
            if key not in presets:
                presets[key] = len(groups)
                groups.append(prepare_slices(image, view, preset).astype(np.float16))  # half the memory, 1e-3 steps
            group_of.append(presets[key])
        positive = []
        for group in range(len(groups)):
            group_values = [v for c, g in zip(channels, group_of, strict=True) if g == group for v in c]
            positive.append(np.flatnonzero(np.isin(values, group_values).reshape(values.shape[0], -1).any(axis=1)))
        return _Volume(groups, values, positive, channels, group_of)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Random per index, reproducible: ranks of a distributed run (disjoint indices) see different samples.
        rng = np.random.default_rng([self.seed, self.first_index + index])
        volume = self.volumes[rng.integers(len(self.volumes))]
        group = int(rng.integers(len(volume.groups)))
        scaled, positive = volume.groups[group], volume.positive[group]
        depth = scaled.shape[0]
        if len(positive) and rng.random() < self.positive_fraction:
            anchor = int(rng.choice(positive))
        else:
            anchor = int(rng.integers(depth))
        if self.anchor_first:
            direction = 1 if rng.random() < 0.5 else -1
            rows = np.clip(anchor + direction * np.arange(self.clip), 0, depth - 1)
        else:
            start = int(np.clip(anchor - self.clip // 2, 0, max(depth - self.clip, 0)))
            rows = np.clip(np.arange(start, start + self.clip), 0, depth - 1)
        image = torch.from_numpy(scaled[rows].astype(np.float32))
        image = image.permute(0, 3, 1, 2) if image.ndim == 4 else image[:, None]  # clip x (1 or 3) x H x W
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            image = convert_to_tensor(self.augment(image), track_meta=False).clamp(0, 1)  # plain tensors collate
        slices = volume.values[rows]
        masks = [np.isin(slices, v) if v is not None else np.zeros_like(slices, bool) for v in volume.channels]
        target = torch.from_numpy(np.stack(masks, axis=1)).float()
        size = (self.image_size, self.image_size)
        image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        target = F.interpolate(target, size=size, mode="nearest")
        valid = torch.tensor([g == group for g in volume.group_of], dtype=torch.float32)
        annotated = torch.tensor([g is not None for g in volume.group_of], dtype=torch.float32)
        sample = {"image": (image - 0.5) / 0.5, "target": target, "valid": valid, "annotated": annotated}
        if self.absent:  # "not here" prompts for the presence score; their targets are empty (PromptStep)
            drawn = rng.choice(len(self.absent), self.negatives, replace=False)
            if rng.random() >= self.negative_fraction:
                drawn[:] = -1  # none for this sample; the same length, so batches collate
            sample["absent"] = torch.from_numpy(drawn)
        return sample


class _Volume(NamedTuple):
    groups: list[np.ndarray]  # per intensity preset: D x H x W (x 3) float16 in [0, 1], in the model's view
    values: np.ndarray  # D x H x W label values
    positive: list[np.ndarray]  # per preset group: slices showing one of its structures
    channels: list[list[int] | None]  # the label values of each training label name, None where not annotated
    group_of: list[int | None]  # each training label's preset group, None where not annotated


def per_query(flags: torch.Tensor, clip: int) -> torch.Tensor:
    """B x P per-sample flags of a batch as one flag per query n = p * (B * clip) + i (the detector's order)."""
    return flags[:, None].expand(-1, clip, -1).flatten(0, 1).transpose(0, 1).flatten(0, 1)


def batch_prompts(
    batch: dict[str, torch.Tensor], prompts: Sequence[str], absent_prompts: Sequence[str], clicks: bool
) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """The prompts one batch trains, their B x clip x P x S x S targets and B x P ``valid``/``annotated`` flags.

    Text prompts train on the sample's intensity preset only (``valid``); clicks on every structure the item
    annotates: the tracker is class-agnostic (the click, not a name, says which structure), and a slice with
    several structures to click is what teaches it to follow the click rather than segment the likeliest one.
    Labels no sample uses are left out of the forward; the absent labels drawn for the batch are appended with empty
    targets, as text prompts only (never clicked). They are in no training image, so each is a negative for every
    sample of the batch, not only the one that drew it: the forward runs every prompt on every slice anyway.
    """
    trained = torch.maximum(batch["valid"], batch["annotated"]) if clicks else batch["valid"]
    used = trained.bool().any(dim=0).nonzero().flatten().tolist()
    names = [prompts[p] for p in used]
    targets = batch["target"][:, :, used]
    flags = {key: batch[key][:, used] for key in ("valid", "annotated")}
    if "absent" in batch:
        drawn = batch["absent"][batch["absent"] >= 0].unique().tolist()
        names += [absent_prompts[a] for a in drawn]
        empty = targets.new_zeros((*targets.shape[:2], len(drawn), *targets.shape[3:]))
        targets = torch.cat([targets, empty], dim=2)
        flags["valid"] = F.pad(flags["valid"], (0, len(drawn)), value=1.0)
        flags["annotated"] = F.pad(flags["annotated"], (0, len(drawn)))
    return names, targets, flags
