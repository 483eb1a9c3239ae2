"""Segment one image from a :class:`~scripts.prompts.PromptSet`: the path shared by the bundle and MONAI Label.

An image is put in the model's view (slices along the patient's axial axis, or coronal/sagittal when asked)
by permutations and flips only, normalised with the vocabulary's intensity preset, encoded once per preset,
prompted, and the label map is mapped back to the exact voxel grid of the input.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .click_boundaries import redraw_near_clicks
from .click_selection import build_from_clicks, follows_clicks, refine_with_instances, structure_under_clicks
from .encoding_cache import EncodingCache, image_key
from .image_io import ImageVolume
from .intensity import guess_modality
from .label_numbering import value_names, vocabulary_values
from .low_res_grid import pixel_cells
from .orientation import SliceView
from .predictor import Medsam3Predictor, PromptResult, VolumeEncoding
from .presence_pass import PRESENCE_MARGIN
from .prompts import PromptSet
from .slices import prepare_slices, preset_for
from .vocabulary import ResolvedPrompt, Vocabulary

__all__ = ["SegmentationResult", "VolumeSegmenter"]

logger = logging.getLogger(__name__)

UNNAMED_OBJECT = ResolvedPrompt(name="object", index=None, prompts=(), known=False)  # clicks without a text prompt
CLICK_REFINEMENTS = ("auto", "tracker", "instances")  # how clicks refine a text result (docs/clicks.md)
NAMED_STRUCTURES_KEPT = 256  # clicks-alone look-ups remembered per segmenter: one per image and first clicked slice
# (the clicks' low-resolution cells, their labels) -> the prompt the clicks follow and its encoding, or None
FollowedPrompt = Callable[[np.ndarray, np.ndarray], "tuple[str, VolumeEncoding] | None"]


@dataclass
class SegmentationResult:
    """A label map in the input's voxel grid plus what each label is and how sure the model was."""

    label: np.ndarray
    labels: list[dict[str, Any]]
    unknown_prompts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What the result's JSON states: label rows, the value -> name mapping of the label map, timings."""
        return {
            "labels": self.labels,
            "label_values": value_names(self.labels),
            "unknown_prompts": self.unknown_prompts,
            "timings": self.timings,
        }


class VolumeSegmenter:
    """Turns images and prompts into label maps with one :class:`Medsam3Predictor`."""

    def __init__(
        self,
        predictor: Medsam3Predictor,
        vocabulary: Vocabulary,
        plane: str = "axial",
        modality: str = "auto",
        cache: EncodingCache | None = None,
        click_refinement: str = "auto",
        click_radius_mm: float = 0.0,
    ) -> None:
        if modality not in ("auto", "CT", "MR"):
            raise ValueError(f"modality must be 'auto', 'CT' or 'MR', got {modality!r}")
        if click_refinement not in CLICK_REFINEMENTS:
            raise ValueError(
                f"click_refinement must be one of {', '.join(CLICK_REFINEMENTS)}, got {click_refinement!r}"
            )
        is_number = isinstance(click_radius_mm, (int, float)) and not isinstance(click_radius_mm, bool)
        if not (is_number and 0 <= click_radius_mm < float("inf")):
            raise ValueError(f"click_radius_mm must be a distance of 0 mm or more, got {click_radius_mm!r}")
        self.click_refinement = click_refinement
        self.click_radius_mm = float(click_radius_mm)  # how near a click the image may redraw the boundary; 0: off
        self.predictor = predictor
        self.vocabulary = vocabulary
        self.plane = plane
        self.modality = modality
        self.cache = cache  # reuse encodings across calls (the MONAI Label server); None: per call only
        # Which prompt clicks alone follow, per image and foreground clicks on the first one's slice: a session's
        # later clicks name the same structure without asking the whole vocabulary again. The segmenter is
        # rebuilt when the weights change, and the key holds the image file's modification time.
        self._named: OrderedDict[tuple, str | None] = OrderedDict()
        self._named_lock = threading.Lock()

    @property
    def click_min_score(self) -> float:
        """The least score of an instance a click may pick: half the text threshold (:data:`PRESENCE_MARGIN`), the
        faint edge of a structure, not the near-zero blobs of the detector's unused queries."""
        return PRESENCE_MARGIN * self.predictor.score_threshold

    def resolve(self, prompts: PromptSet) -> list[ResolvedPrompt]:
        """Each text prompt's label; two naming the same label ("liver" and its index "1") are refused, as the
        label would be listed twice."""
        resolved = [self.vocabulary.resolve(text) for text in prompts.texts]
        seen: dict[str, str] = {}
        for text, entry in zip(prompts.texts, resolved, strict=True):
            if entry.known and seen.setdefault(entry.name, text) != text:
                raise ValueError(f"Text prompts {seen[entry.name]!r} and {text!r} both name the label {entry.name!r}")
        return resolved

    def segment(self, image: ImageVolume, prompts: PromptSet) -> SegmentationResult:
        """Segment ``image``; raises ``ValueError`` for prompts that do not fit it."""
        prompts.check_inside(image.array.shape[:2] if image.is_2d else image.array.shape)
        timer = self.predictor.timer
        timer.reset()
        view = SliceView.for_volume(image, self.plane)
        modality = self._modality(image)
        resolved = self.resolve(prompts)
        memo: dict[tuple, VolumeEncoding] = {}

        def encoding_for(entry: ResolvedPrompt | None) -> VolumeEncoding:
            return self._encoding(image, view, preset_for(image, self.vocabulary, entry, modality), memo)

        if len(prompts.points) or len(prompts.boxes):
            entry = resolved[0] if resolved else None
            encoding = encoding_for(entry)
            # the text result is what clicks refine; with a box the box's result is (the text names the label)
            asks_text = entry is not None and not len(prompts.boxes)
            initial = self.predictor.segment_text(encoding, entry.prompts[:1])[0] if asks_text else None
            follow = (
                (lambda cells, labels: (entry.prompts[0], encoding))
                if entry
                else functools.partial(self._name_under_clicks, image, view, modality, memo)
            )
            results = [self._geometric(encoding, view, prompts, initial, follow)]
            (value,) = vocabulary_values([entry or UNNAMED_OBJECT], self.vocabulary)
            rows = [self._row(entry, results[0], "clicks" if len(prompts.points) else "boxes", value=value)]
        else:
            encodings = [encoding_for(entry) for entry in resolved]
            encoding = encodings[-1]
            results = self._text_results(encodings, resolved)
            values = vocabulary_values(resolved, self.vocabulary)
            rows = [self._row(e, r, "text", value=v) for e, r, v in zip(resolved, results, values, strict=True)]
        label_view = self.predictor.label_map(encoding, results, [row["index"] for row in rows])
        boxed = np.bool_(True)  # no box: everywhere
        if len(prompts.boxes):  # masks upsampled from the low-resolution grid reach up to a cell past a box's edge
            boxed = view.to_view(prompts.inside_boxes(view.source_shape))
            label_view[~boxed] = 0
        clicked = view.points_to_view(prompts.points_3d())
        if len(clicked) and self.click_radius_mm > 0:  # the image redraws the boundary near each click
            with timer.stage("click_boundaries"):
                intensities = view.to_view(image.array.mean(axis=-1) if image.is_rgb else image.array)
                near = redraw_near_clicks(
                    intensities, label_view > 0, clicked, prompts.point_labels, view.spacing, self.click_radius_mm
                )
            label_view[near & boxed] = rows[0]["index"]
            label_view[~near] = 0
        if len(clicked):  # a click states what its voxel is: foreground clicks in, background clicks out
            label_view[tuple(clicked.T)] = np.where(prompts.point_labels == 1, rows[0]["index"], 0)
        label = view.from_view(label_view)
        if image.is_2d:
            label = label.reshape(image.array.shape[:2])
        for row in rows:
            row["voxels"] = int((label == row["index"]).sum())
        unknown = [row["prompt"] for row in rows if row["known"] is False]
        for text in unknown:
            logger.warning("%r is not in the label vocabulary: used as free text", text)
        return SegmentationResult(label=label, labels=rows, unknown_prompts=unknown, timings=timer.as_dict())

    def encode(self, image: ImageVolume, text: str | None = None) -> VolumeEncoding:
        """The encoding a prompt ``text`` would use on ``image`` (its intensity preset), cached when possible."""
        entry = self.vocabulary.resolve(text) if text else None
        preset = preset_for(image, self.vocabulary, entry, self._modality(image))
        return self._encoding(image, SliceView.for_volume(image, self.plane), preset, {})

    # ------------------------------------------------------------------------------------------------ helpers
    def _encoding(self, image: ImageVolume, view: SliceView, preset: dict, memo: dict) -> VolumeEncoding:
        """Encode once per (image, plane, preset): in this call (``memo``) and across calls (``cache``)."""
        return self._encoded(_encoding_key(image, view, preset), memo, image, view, preset, slice(None))

    def _encoded(
        self, key: tuple, memo: dict, image: ImageVolume, view: SliceView, preset: dict, slices: slice
    ) -> VolumeEncoding:
        """The encoding of ``slices`` of the image under ``key``: from this call's ``memo``, the server's cache, or
        encoded now (and kept in both)."""
        if key not in memo:
            cache = self._cache_for(image)
            cached = cache.get(key) if cache is not None else None
            if cached is None:
                with self.predictor.timer.stage("preprocess"):
                    pixels = self._slices(image, view, preset)[slices]
                cached = self.predictor.encode(pixels)
                if cache is not None:
                    cache.put(key, cached)
            memo[key] = cached
        return memo[key]

    def _geometric(
        self,
        encoding: VolumeEncoding,
        view: SliceView,
        prompts: PromptSet,
        initial: PromptResult | None,
        follow: FollowedPrompt,
    ) -> PromptResult:
        if len(prompts.boxes):
            boxes = prompts.boxes_3d()
            per_slice: dict[int, tuple[int, int, int, int]] = {}
            for d0, h0, w0, d1, h1, w1 in view.boxes_to_view(boxes):
                for d in range(int(d0), int(d1) + 1):
                    if d in per_slice:  # the tracker takes one box per slice; a second would silently replace it
                        raise ValueError(
                            f"Two boxes reach slice {d} of the {view.plane} view: give one box per slice (boxes "
                            "segment one structure; send separate requests for separate structures)"
                        )
                    per_slice[d] = (h0, w0, h1, w1)
            result = self.predictor.segment_boxes(encoding, per_slice)
            if not len(prompts.points):
                return result
            initial = result
        points = view.points_to_view(prompts.points_3d())
        labels = np.asarray(prompts.point_labels)
        cells = pixel_cells(points, encoding.height, encoding.width, self.predictor.low_res)
        if self.click_refinement == "instances" and not len(prompts.boxes):
            refined = self._refine_with_instances(cells, labels, initial, follow)
            if refined is not None:
                return refined
        tracked = self.predictor.segment_clicks(encoding, points, labels, initial=initial)
        if self.click_refinement != "auto" or len(prompts.boxes) or follows_clicks(tracked.logits, cells, labels):
            return tracked
        logger.info("The tracker's mask contradicts the clicks: the detector's instances answer them instead")
        refined = self._refine_with_instances(cells, labels, initial, follow)
        return tracked if refined is None else refined

    def _refine_with_instances(
        self, cells: np.ndarray, labels: np.ndarray, initial: PromptResult | None, follow: FollowedPrompt
    ) -> PromptResult | None:
        """Clicks choose among the detector's instances (:mod:`scripts.click_selection`) of the prompt ``follow``
        names: the text prompt, or without one, the prompt whose instance holds the foreground clicks. None (the
        tracker answers) when there is no text prompt and no prompt's instance holds them.

        Without a text prompt the foreground clicks build the result from nothing
        (:func:`scripts.click_selection.build_from_clicks`)."""
        predictor = self.predictor
        followed = follow(cells, labels)
        if followed is None:
            logger.info("No detector instance holds the clicks: the tracker answers them")
            return None
        text, encoding = followed
        refine = refine_with_instances
        if initial is None:
            logger.info("Clicks without a text prompt follow the instances of %r", text)
            initial, refine = PromptResult(*predictor.empty_result(encoding)), build_from_clicks

        def candidates(index: int) -> tuple[torch.Tensor, torch.Tensor]:  # not kept: 66 MB per slice at base
            masks, scores = predictor.text_candidates(encoding, [text], index)
            return masks[0], scores[0]

        refined = refine(initial.logits, initial.scores, candidates, cells, labels, min_score=self.click_min_score)
        return PromptResult(*refined)

    def _name_under_clicks(
        self,
        image: ImageVolume,
        view: SliceView,
        modality: str,
        memo: dict,
        cells: np.ndarray,
        labels: np.ndarray,
    ) -> tuple[str, VolumeEncoding] | None:
        """The vocabulary prompt whose instance holds the first foreground click, and the encoding of its intensity
        preset; remembered for the later requests of the same click session. Only the first click names: later
        ones correct, and a correction at the structure's edge is often also inside its neighbour."""
        first = cells[labels == 1][:1]
        index = int(first[0, 0])
        key = image_key(image.path, view.plane, modality, image.array.shape, tuple(int(v) for v in first[0]))
        presets = self._presets(image, modality)
        kept = _on_disk(image)  # an image made in memory has no file to key it by: looked up every time
        with self._named_lock:
            known = kept and key in self._named
            text = self._named.get(key)
        if not known:
            text = self._look_up_structure(image, view, presets, memo, first, index)
            if kept:
                with self._named_lock:
                    self._named[key] = text
                    while len(self._named) > NAMED_STRUCTURES_KEPT:
                        self._named.popitem(last=False)
        if text is None:
            return None
        return text, self._encoding(image, view, presets[text], memo)

    def _presets(self, image: ImageVolume, modality: str) -> dict[str, dict]:
        """Each vocabulary label's canonical prompt and the intensity preset it is asked in."""
        presets = {}
        for name in self.vocabulary.names:
            entry = self.vocabulary.resolve(name)
            presets.setdefault(entry.prompts[0], preset_for(image, self.vocabulary, entry, modality))
        return presets

    def _look_up_structure(
        self, image: ImageVolume, view: SliceView, presets: dict[str, dict], memo: dict, cells: np.ndarray, index: int
    ) -> str | None:
        """Ask every vocabulary prompt, each in its own preset (the bone window for the vertebrae, the vessel window
        for the aorta), on the first foreground click's slice ``index``; :func:`structure_under_clicks` picks the
        answer. Only the batch of slices holding ``index`` is encoded per preset."""
        groups: dict[str, tuple[dict, list[str]]] = {}
        for prompt, preset in presets.items():
            groups.setdefault(repr(sorted(preset.items())), (preset, []))[1].append(prompt)
        at_index = {key: self._slice_encoding(image, view, preset, index, memo) for key, (preset, _) in groups.items()}
        group_of = {prompt: key for key, (_, prompts) in groups.items() for prompt in prompts}

        def lookup(prompts: Sequence[str], _: int) -> tuple[torch.Tensor, torch.Tensor]:
            answers = {}
            for key in dict.fromkeys(group_of[p] for p in prompts):
                members = [p for p in prompts if group_of[p] == key]
                encoding, local = at_index[key]
                masks, scores = self.predictor.text_candidates(encoding, members, local)
                answers.update({p: (m, s) for p, m, s in zip(members, masks, scores, strict=True)})
            return torch.stack([answers[p][0] for p in prompts]), torch.stack([answers[p][1] for p in prompts])

        return structure_under_clicks(
            list(group_of), lookup, cells, np.ones(len(cells), int), self.predictor.batch_size, self.click_min_score
        )

    def _slice_encoding(
        self, image: ImageVolume, view: SliceView, preset: dict, index: int, memo: dict
    ) -> tuple[VolumeEncoding, int]:
        """Slice ``index`` of ``preset``'s encoding and its index there: the whole volume's encoding when there is
        one, else that of the one batch of slices holding ``index``, which gives the slice the same features (3D
        adapters see the slices of one batch). The server's cache keeps the batch for the session's next clicks."""
        key = _encoding_key(image, view, preset)
        cache = self._cache_for(image)
        whole = memo.get(key) or (cache.get(key) if cache is not None else None)
        if whole is not None:
            return whole, index
        start, size = index - index % self.predictor.batch_size, self.predictor.batch_size
        batch = self._encoded((*key, "slices", start, size), memo, image, view, preset, slice(start, start + size))
        return batch, index - start

    def _cache_for(self, image: ImageVolume) -> EncodingCache | None:
        """The server's cache, for images read from a file or folder: their keys hold its path and modification
        time. An image made in memory has neither, so two of them would share a key."""
        return self.cache if _on_disk(image) else None

    def _modality(self, image: ImageVolume) -> str:
        if self.modality != "auto":
            return self.modality
        return guess_modality(image.array)

    def _text_results(self, encodings: list[VolumeEncoding], entries: list[ResolvedPrompt]) -> list[PromptResult]:
        """Each entry's text result; the prompts sharing an encoding (an intensity preset) run through the heads
        together, so many labels cost about as much as a few."""
        groups: dict[int, list[int]] = {}
        for i, encoding in enumerate(encodings):
            groups.setdefault(id(encoding), []).append(i)
        results: list[PromptResult | None] = [None] * len(entries)
        for members in groups.values():
            # The first synonym is the canonical prompt; the rest serve fine-tuning and disagreement scoring.
            answers = self.predictor.segment_text(encodings[members[0]], [entries[i].prompts[0] for i in members])
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
        return results

    @staticmethod
    def _slices(image: ImageVolume, view: SliceView, preset: dict) -> torch.Tensor:
        """D x 3 x H x W float32 in [0, 1], in the model's view of the image."""
        tensor = torch.from_numpy(prepare_slices(image, view, preset))
        if image.is_rgb:
            return tensor.permute(0, 3, 1, 2)  # D x H x W x 3 -> D x 3 x H x W
        return tensor[:, None].expand(-1, 3, -1, -1)

    @staticmethod
    def _row(entry: ResolvedPrompt | None, result: PromptResult, source: str, value: int) -> dict[str, Any]:
        return {
            "index": int(value),
            "name": entry.name if entry else "object",
            "prompt": entry.prompts[0] if entry else None,
            "known": entry.known if entry else None,
            "score": round(result.score, 4),
            "source": source,
        }


def _on_disk(image: ImageVolume) -> bool:
    return str(image.path) not in ("", ".") and image.path.exists()


def _encoding_key(image: ImageVolume, view: SliceView, preset: dict) -> tuple:
    return image_key(image.path, view.plane, repr(sorted(preset.items())), image.array.shape)
