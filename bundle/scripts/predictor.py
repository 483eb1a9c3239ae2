"""Encode a stack of slices once, then answer many text, box and click prompts on it.

The predictor works in *view space*: a stack of D slices of H x W pixels (see :mod:`scripts.orientation`),
already normalised to [0, 1] with 3 channels. It resizes slices to the model's square input, caches the ViT
trunk output of every slice (the necks are cheap and recomputed per use, which keeps a 300-slice CT at ~3 GB in
bf16 on the GPU) and returns low-resolution mask logits per slice, turned into label maps by :meth:`label_map`.

Text prompts go through the detector (instances scored by detection x presence; :meth:`text_candidates` gives all
of one slice's, for clicks to choose from); boxes and clicks go through the tracker's SAM heads, and clicks on a
volume are propagated slice by slice in both directions with the tracker's memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cpu_compat import device_fallbacks, precision
from .low_res_grid import box_window
from .network import EMPTY_LOGIT, MedSam3, find_stage, text_result_logits
from .presence_pass import (
    PRESENCE_MARGIN,
    Plan,
    check_smoothing,
    coarse_slices,
    neighbourhood_plan,
    plan_chunks,
    smoothed_scores,
)
from .prompts import parse_flag
from .timing import StageTimer
from .volume_encoding import PromptResult, VolumeEncoding

__all__ = ["EMPTY_LOGIT", "Medsam3Predictor", "PromptResult", "VolumeEncoding"]

logger = logging.getLogger(__name__)

MAX_PROMPTS_PER_FORWARD = 64  # text prompts answered in one detector forward (x slices: the memory cap)
TEXT_BATCH_DIM = {"language_features": 1, "language_mask": 0, "language_embeds": 1}  # the prompts' axis
MAX_CLICKS_PER_SLICE = 16  # upstream Sam3TrackerPredictor's max_point_num_in_prompt_enc


class Medsam3Predictor:
    """Stateless between calls except for what :meth:`encode` returns, so one model serves many volumes."""

    def __init__(
        self,
        model: MedSam3,
        batch_size: int = 8,
        score_threshold: float = 0.5,
        max_empty_slices: int | None = 5,
        propagation_confidence: float = 0.8,
        memory_selection: bool = True,
        presence_stride: int = 1,
        score_smoothing: int = 1,
        amp: bool = True,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.model = model.eval()
        self.batch_size = batch_size
        self.score_threshold = score_threshold
        if max_empty_slices is not None and (isinstance(max_empty_slices, bool) or not int(max_empty_slices) >= 1):
            raise ValueError(f"max_empty_slices must be at least 1 (or null: no limit), got {max_empty_slices!r}")
        self.max_empty_slices = max_empty_slices
        if not 0.5 <= propagation_confidence <= 1.0:
            raise ValueError(f"propagation_confidence must be in [0.5, 1], got {propagation_confidence}")
        self.propagation_confidence = propagation_confidence
        coarse_slices(1, presence_stride)  # refuses a stride below 1
        self.presence_stride = presence_stride  # many labels: coarse pass first (scripts/presence_pass.py)
        check_smoothing(score_smoothing)
        self.score_smoothing = score_smoothing  # which slices show a label: mean score over this many slices
        # As SAM 3's video predictor: only confident slices enter the tracker's memory (docs/clicks.md)
        model.tracker.use_memory_selection = parse_flag(memory_selection, "memory_selection")
        self.progress = progress
        self.device = model.device
        self.amp = amp and self.device.type == "cuda"  # see precision()
        self.timer = StageTimer(self.device)
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with torch.inference_mode(), precision(self.device, self.amp), device_fallbacks(self.device):
            yield

    def _batches(self, count: int, desc: str) -> Iterator[slice]:
        starts = range(0, count, self.batch_size)
        if self.progress and count > self.batch_size:
            starts = tqdm(starts, desc=desc, unit="batch", leave=False)
        for start in starts:
            yield slice(start, min(start + self.batch_size, count))

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(self, slices: torch.Tensor | np.ndarray) -> VolumeEncoding:
        """Encode D x 3 x H x W slices with values in [0, 1]; the result serves every later prompt."""
        slices = torch.as_tensor(slices)
        if slices.ndim != 4 or slices.shape[1] != 3:
            raise ValueError(f"Expected slices as D x 3 x H x W, got shape {tuple(slices.shape)}")
        if slices.shape[0] == 0:
            raise ValueError("No slices to encode")
        trunks = []
        with self._running():
            for batch in self._batches(slices.shape[0], "encoding slices"):
                with self.timer.stage("preprocess"):
                    x = slices[batch].to(self.device, torch.float32, non_blocking=True)
                    x = F.interpolate(x, size=(self.model.image_size,) * 2, mode="bilinear", align_corners=False)
                    x = (x - 0.5) / 0.5  # SAM3's image mean and std are 0.5
                with self.timer.stage("image_encoder"):
                    trunks.append(self.model.detector.backbone.vision_backbone.trunk(x)[-1])
        return VolumeEncoding(trunk=torch.cat(trunks), height=int(slices.shape[2]), width=int(slices.shape[3]))

    def _neck(self, trunk: torch.Tensor, tracker: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Feature pyramid (3 levels, finest first) and position encodings from cached trunk features."""
        neck = self.model.detector.backbone.vision_backbone
        convs = neck.sam2_convs if tracker else neck.convs
        feats = [conv(trunk) for conv in convs][:-1]  # scalp=1: SAM3 drops the coarsest level
        pos = [neck.position_encoding(f).to(f.dtype) for f in feats]
        if tracker:  # the SAM mask decoder's high-resolution projections, precomputed once per slice
            decoder = self.model.tracker.sam_mask_decoder
            feats[0], feats[1] = decoder.conv_s0(feats[0]), decoder.conv_s1(feats[1])
        return feats, pos

    # ----------------------------------------------------------------------------------------------- text
    def _encode_text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with self.timer.stage("text_encoder"):
                out = self.model.detector.backbone.forward_text(missing, device=self.device)
            for i, prompt in enumerate(missing):
                self._text_cache[prompt] = {key: out[key].narrow(dim, i, 1) for key, dim in TEXT_BATCH_DIM.items()}
        entries = [self._text_cache[p] for p in prompts]
        return {key: torch.cat([e[key] for e in entries], dim=dim) for key, dim in TEXT_BATCH_DIM.items()}

    def segment_text(self, encoding: VolumeEncoding, prompts: Sequence[str]) -> list[PromptResult]:
        """Per prompt and slice: the union of instances scoring above the threshold, on the slices that show the
        prompt (its score there, or with ``score_smoothing`` its mean score around there, passes the threshold; a
        slice shown only by the mean keeps its best instance). Results are kept on ``encoding``."""
        if not prompts:
            raise ValueError("No text prompts given")
        settings = (self.score_threshold, self.score_smoothing)  # what a kept result depends on besides its prompt
        missing = [p for p in dict.fromkeys(prompts) if (p, *settings) not in encoding.text_results]
        for start in range(0, len(missing), MAX_PROMPTS_PER_FORWARD):  # bounds the queries of one forward
            chunk = missing[start : start + MAX_PROMPTS_PER_FORWARD]
            for prompt, result in zip(chunk, self._segment_text(encoding, chunk), strict=True):
                encoding.text_results[(prompt, *settings)] = result
        return [encoding.text_results[(p, *settings)] for p in prompts]

    def _segment_text(self, encoding: VolumeEncoding, prompts: Sequence[str]) -> list[PromptResult]:
        num, low = encoding.num_slices, self.low_res
        logits = torch.full((len(prompts), num, low, low), EMPTY_LOGIT, dtype=torch.float16, device=self.device)
        scores = torch.zeros(len(prompts), num, device=self.device)
        everyone = list(range(len(prompts)))
        coarse = coarse_slices(num, self.presence_stride)
        with self._running():
            text = self._encode_text(prompts)
            self._answer(encoding, text, [(index, everyone) for index in coarse], logits, scores)
            rest = neighbourhood_plan(coarse, scores[:, coarse].cpu().numpy(), self.score_threshold, num)
            self._answer(encoding, text, rest, logits, scores)
            shown = smoothed_scores(scores, self.score_smoothing)
            logits[(shown <= self.score_threshold) & (scores > self._mask_gate)] = EMPTY_LOGIT  # the masks it drops
        return [PromptResult(logits=logits[i], scores=shown[i]) for i in everyone]

    @property
    def _mask_gate(self) -> float:
        """The least score of a (prompt, slice) pair whose mask is computed: smoothing may show a slice scoring below
        the threshold, and such a slice's best instance then needs its mask."""
        return self.score_threshold if self.score_smoothing == 1 else PRESENCE_MARGIN * self.score_threshold

    def _answer(
        self, encoding: VolumeEncoding, text: dict, plan: Plan, logits: torch.Tensor, scores: torch.Tensor
    ) -> None:
        """Answer the plan's (slice, prompt) pairs, several slices per forward: each pair is one detector query."""
        low, gate = self.low_res, self._mask_gate
        for chunk in plan_chunks(plan, max(self.batch_size, len(text["language_mask"]))):
            with self.timer.stage("heads"):
                slice_ids = torch.tensor([index for index, _ in chunk], device=self.device)
                img_ids = torch.tensor([i for i, (_, ps) in enumerate(chunk) for _ in ps], device=self.device)
                text_ids = torch.tensor([p for _, ps in chunk for p in ps], device=self.device)
                out = self._detect(encoding, text, (slice_ids, img_ids, text_ids), gate)
                # supervise_joint_box_scores: pred_logits already include the presence score
                union = text_result_logits(out, self.score_threshold, best_above=gate).view(-1, low, low)
                logits[text_ids, slice_ids[img_ids]] = union.clamp_min(EMPTY_LOGIT).half()
                scores[text_ids, slice_ids[img_ids]] = out["pred_logits"].float().sigmoid().squeeze(-1).amax(dim=1)

    def _detect(self, encoding: VolumeEncoding, text: dict, pairs: tuple[torch.Tensor, ...], threshold: float) -> dict:
        """The detector on (slice, image in batch, text) index triples; the mask head runs only above ``threshold``."""
        slice_ids, img_ids, text_ids = pairs
        feats, pos = self._neck(encoding.trunk[slice_ids], tracker=False)
        backbone_out = {"vision_features": feats[-1], "vision_pos_enc": pos, "backbone_fpn": feats, **text}
        return self.model.detector.forward_presence_gated(backbone_out, find_stage(img_ids, text_ids), threshold)

    def text_candidates(self, encoding: VolumeEncoding, prompts: Sequence[str], index: int) -> tuple[torch.Tensor, ...]:
        """Every instance the detector proposes for each prompt on slice ``index``, whatever its score: P x Q x h x w
        mask logits and P x Q scores, for clicks to choose from (:mod:`scripts.click_selection`); one forward."""
        pairs = (torch.tensor([index]), torch.zeros(len(prompts), dtype=torch.long), torch.arange(len(prompts)))
        with self._running(), self.timer.stage("heads"):
            out = self._detect(encoding, self._encode_text(prompts), tuple(t.to(self.device) for t in pairs), -1.0)
        return out["pred_masks"].float(), out["pred_logits"].float().sigmoid().squeeze(-1)

    @property
    def low_res(self) -> int:
        return 4 * self.model.size.feature_size

    # ----------------------------------------------------------------------------------------------- tracker
    def _require_tracker(self) -> None:
        if not getattr(self.model, "interactive", True):
            raise ValueError(
                "Box and click prompts need the SAM3 tracker weights, which the loaded checkpoint lacks: "
                "give the SAM3 checkpoint (sam3.pt) as tracker_ckpt_path"
            )

    def _tracker_features(self, encoding: VolumeEncoding, index: int) -> tuple[list, list, list]:
        feats, pos = self._neck(encoding.trunk[index : index + 1], tracker=True)
        sizes = [(f.shape[-2], f.shape[-1]) for f in feats]
        flat = [f.flatten(2).permute(2, 0, 1) for f in feats]  # HW x 1 x C, as the tracker expects
        flat_pos = [p.flatten(2).permute(2, 0, 1) for p in pos]
        return flat, flat_pos, sizes

    def _to_model_xy(self, encoding: VolumeEncoding, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Pixel centres (row, col) of a slice -> (x, y) in the model's square input."""
        size = self.model.image_size
        x = (np.asarray(cols, dtype=np.float32) + 0.5) * size / encoding.width
        y = (np.asarray(rows, dtype=np.float32) + 0.5) * size / encoding.height
        return torch.as_tensor(np.stack([x, y], axis=-1), device=self.device)

    def _track_step(
        self,
        encoding: VolumeEncoding,
        index: int,
        memory: dict,
        conditioning: bool,
        reverse: bool = False,
        point_inputs: dict | None = None,
        mask_logits: torch.Tensor | None = None,
    ) -> dict:
        feats, pos, sizes = self._tracker_features(encoding, index)
        return self.model.tracker.track_step(
            frame_idx=index,
            is_init_cond_frame=conditioning,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            image=None,
            point_inputs=point_inputs,
            mask_inputs=None,
            output_dict=memory,
            num_frames=encoding.num_slices,
            track_in_reverse=reverse,
            run_mem_encoder=encoding.num_slices > 1,
            prev_sam_mask_logits=mask_logits,
        )

    def segment_boxes(self, encoding: VolumeEncoding, boxes: dict[int, Sequence[float]]) -> PromptResult:
        """One object per slice from a box ``{slice: (row0, col0, row1, col1)}`` (inclusive pixel corners).

        The mask is kept inside the box: a box prompt states where the structure is.
        """
        self._require_tracker()
        logits, scores = self.empty_result(encoding)
        low = self.low_res
        with self._running():
            for index, (r0, c0, r1, c1) in sorted(boxes.items()):
                corners = self._to_model_xy(encoding, np.array([r0 - 0.5, r1 + 0.5]), np.array([c0 - 0.5, c1 + 0.5]))
                points = {
                    "point_coords": corners[None],
                    "point_labels": torch.tensor([[2, 3]], dtype=torch.int32, device=self.device),
                }
                with self.timer.stage("heads"):
                    out = self._track_step(encoding, index, _new_memory(), conditioning=True, point_inputs=points)
                inside = box_window(low, encoding.height, encoding.width, (r0, c0, r1, c1), self.device)
                logits[index] = torch.where(inside, out["pred_masks"][0, 0].float(), EMPTY_LOGIT).half()
                scores[index] = out["object_score_logits"].float().sigmoid().max()
        return PromptResult(logits=logits, scores=scores)

    def segment_clicks(
        self,
        encoding: VolumeEncoding,
        points: np.ndarray,
        labels: np.ndarray,
        initial: PromptResult | None = None,
    ) -> PromptResult:
        """Segment from clicks ``points`` (N x 3 view voxels (slice, row, col)) with ``labels`` (1 fg, 0 bg).

        Clicked slices are segmented from their clicks (and, when given, the ``initial`` result's mask on that
        slice, so clicks refine a text result); the mask is then propagated through the stack in both directions
        with the tracker's memory, stopping after ``max_empty_slices`` slices without the object. On a slice the
        clicks did not touch, an ``initial`` result gives way to the propagated one only where the tracker is
        confident: its object-score probability is at least ``propagation_confidence`` (the structure is there) or
        at most ``1 - propagation_confidence`` (it is not). Slices the propagation does not reach keep ``initial``.
        """
        self._require_tracker()
        points, labels = np.asarray(points), np.asarray(labels)
        if points.ndim != 2 or points.shape[1] != 3 or len(points) != len(labels) or len(points) == 0:
            raise ValueError(f"Expected N x 3 points with N labels, got {points.shape} and {labels.shape}")
        logits, scores = (
            self.empty_result(encoding) if initial is None else (initial.logits.clone(), initial.scores.clone())
        )
        memory = _new_memory()
        clicked = sorted({int(d) for d in points[:, 0]})
        with self._running():
            for index in clicked:
                on_slice = _capped(np.flatnonzero(points[:, 0] == index))
                point_inputs = {
                    "point_coords": self._to_model_xy(encoding, points[on_slice, 1], points[on_slice, 2])[None],
                    "point_labels": torch.as_tensor(labels[on_slice], dtype=torch.int32, device=self.device)[None],
                }
                prior = None
                if initial is not None and bool((initial.logits[index] > 0).any()):
                    prior = initial.logits[index][None, None].float()
                with self.timer.stage("heads"):
                    out = self._track_step(encoding, index, memory, True, point_inputs=point_inputs, mask_logits=prior)
                memory["cond_frame_outputs"][index] = out
                logits[index], scores[index] = out["pred_masks"][0, 0].half(), _object_score(out)
            with self.timer.stage("propagation"):
                for reverse, order in (
                    (False, range(clicked[0] + 1, encoding.num_slices)),
                    (True, range(clicked[-1] - 1, -1, -1)),
                ):
                    self._propagate(
                        encoding, memory, order, reverse, logits, scores, keep_uncertain=initial is not None
                    )
        return PromptResult(logits=logits, scores=scores)

    def _propagate(self, encoding, memory, order, reverse, logits, scores, keep_uncertain) -> None:  # noqa: ANN001
        empty_run = 0
        for index in order:
            if index in memory["cond_frame_outputs"]:
                empty_run = 0
                continue
            out = self._track_step(encoding, index, memory, conditioning=False, reverse=reverse)
            memory["non_cond_frame_outputs"][index] = out
            score = _object_score(out)
            confident = not keep_uncertain or not (
                1.0 - self.propagation_confidence < float(score) < self.propagation_confidence
            )
            if confident:
                logits[index], scores[index] = out["pred_masks"][0, 0].half(), score
            present = bool((out["object_score_logits"] > 0).any()) and bool((out["pred_masks"] > 0).any())
            empty_run = 0 if present else empty_run + 1
            if self.max_empty_slices is not None and empty_run >= self.max_empty_slices:
                break

    def empty_result(self, encoding: VolumeEncoding) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low_res
        return (
            torch.full((encoding.num_slices, low, low), EMPTY_LOGIT, dtype=torch.float16, device=self.device),
            torch.zeros(encoding.num_slices, device=self.device),
        )

    # ----------------------------------------------------------------------------------------------- output
    def label_map(self, encoding: VolumeEncoding, results: Sequence[PromptResult], values: Sequence[int]) -> np.ndarray:
        """D x H x W label map: each pixel takes the value of the prompt with the highest positive logit."""
        if len(results) != len(values):
            raise ValueError(f"{len(results)} results but {len(values)} label values")
        dtype = np.uint8 if max(values, default=0) < 256 else np.uint16
        out = np.zeros((encoding.num_slices, encoding.height, encoding.width), dtype=dtype)
        if not results:
            return out
        lut = torch.tensor([0, *values], device=self.device)
        with self._running(), self.timer.stage("assemble_3d"):
            for batch in self._batches(encoding.num_slices, "assembling labels"):
                low = torch.stack([r.logits[batch] for r in results], dim=1).float()  # B x P x h x w
                full = F.interpolate(low, size=(encoding.height, encoding.width), mode="bilinear", align_corners=False)
                best, which = full.max(dim=1)
                out[batch] = lut[torch.where(best > 0, which + 1, 0)].cpu().numpy().astype(dtype)
        return out


def _capped(indices: np.ndarray) -> np.ndarray:
    """At most :data:`MAX_CLICKS_PER_SLICE` clicks of one slice reach the prompt encoder: the first and the latest
    halves, as upstream's video predictor does (its heads were trained with a few points per round)."""
    if len(indices) <= MAX_CLICKS_PER_SLICE:
        return indices
    half = MAX_CLICKS_PER_SLICE // 2
    return np.concatenate([indices[:half], indices[-(MAX_CLICKS_PER_SLICE - half) :]])


def _object_score(out: dict) -> torch.Tensor:
    return out["object_score_logits"].float().sigmoid().max()


def _new_memory() -> dict:
    return {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
