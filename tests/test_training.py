"""Fine-tuning: the loss and its matching, the slice sampler, optimiser groups, and train.json end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sam3.model.text_encoder_ve
import torch
import torch.utils.checkpoint
from helpers import model_outputs, tiny_model

from scripts.checkpoint import TRACKER_PREFIXES, CheckpointError, load_network
from scripts.cpu_compat import device_fallbacks, keep_activations
from scripts.label_numbering import dataset_labels
from scripts.losses import TextPromptLoss
from scripts.phantom import write_phantom
from scripts.training import PromptStep, param_groups, prepare_network
from scripts.training_data import SlicePromptDataset, label_prompts
from scripts.vocabulary import load_vocabulary

REPO = Path(__file__).resolve().parents[1]


def _outputs(num: int = 2, queries: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    return {
        "pred_logits": torch.full((num, queries, 1), -4.0),
        "pred_masks": torch.full((num, queries, size, size), -8.0),
        "presence_logit_dec": torch.full((num, 1), -4.0),
        "semantic_seg": torch.full((num, 1, size, size), -8.0),
    }


def test_loss_rewards_the_matching_query() -> None:
    loss = TextPromptLoss()
    target = torch.zeros(2, 32, 32)
    target[0, 8:24, 8:24] = 1  # structure present on the first pair only
    good = _outputs()
    good["pred_masks"][0, 2, 4:12, 4:12] = 8.0  # query 2 segments it (low-res 16 x 16)
    good["pred_logits"][0, 2] = 4.0
    good["presence_logit_dec"][0] = 4.0
    good["semantic_seg"][0, 0, 4:12, 4:12] = 8.0
    assert (
        TextPromptLoss._match(
            good["pred_masks"],
            good["pred_logits"].squeeze(-1),
            torch.nn.functional.interpolate(target[:, None], size=(16, 16))[:, 0],
        )[0]
        == 2
    )
    bad = _outputs()
    bad["presence_logit_dec"][1] = 4.0  # says present where nothing is
    good_terms, bad_terms = loss(good, target), loss(bad, target)
    assert good_terms["loss"] < 0.2 * bad_terms["loss"]
    assert bad_terms["presence"] > good_terms["presence"] and bad_terms["mask"] > good_terms["mask"]


def test_loss_without_any_structure_keeps_a_graph() -> None:
    outputs = {k: v.clone().requires_grad_(True) for k, v in _outputs().items()}
    terms = TextPromptLoss()(outputs, torch.zeros(2, 32, 32))
    terms["loss"].backward()
    assert outputs["presence_logit_dec"].grad is not None and float(terms["mask"]) == 0.0


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    items = []
    for seed in range(3):
        image, label = write_phantom(root, f"case{seed}", shape=(40, 40, 12), seed=seed)
        items.append({"image": image.name, "label": label.name})
    path = root / "datalist.json"
    path.write_text(
        json.dumps({"training": items[:2], "validation": items[2:], "labels": {"1": "liver", "2": "spleen"}})
    )
    return path


def test_slice_sampler(datalist: Path) -> None:
    items = [
        {k: str(datalist.parent / v) for k, v in item.items()} for item in json.loads(datalist.read_text())["training"]
    ]
    vocabulary = load_vocabulary()
    labels = {1: "liver", 2: "spleen", 7: "hepatic blob"}
    assert label_prompts(labels, vocabulary) == ["liver", "spleen", "hepatic blob"]
    dataset = SlicePromptDataset(
        items, labels, vocabulary, image_size=64, num_samples=20, clip=3, positive_fraction=1.0
    )
    sample = dataset[0]
    assert sample["image"].shape == (3, 3, 64, 64) and sample["target"].shape == (3, 3, 64, 64)
    assert -1.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    positives = [bool(dataset[i]["target"][:, :2].any()) for i in range(len(dataset))]
    assert all(positives)  # positive_fraction=1: every clip shows liver or spleen
    assert not any(bool(dataset[i]["target"][:, 2].any()) for i in range(5))  # label 7 is absent: a negative
    with pytest.raises(ValueError, match="No training items"):
        SlicePromptDataset([], labels, vocabulary, 64, 1)


def test_absent_labels_train_as_not_here(datalist: Path) -> None:
    """Labels no training image shows (``absent_labels``) are drawn a few per sample and join the batch's text
    prompts with empty targets, never clicked, as negatives for every sample of the batch; the item's own labels keep
    their targets and flags. ``negative_fraction`` leaves the rest of the samples without a draw (-1)."""
    from scripts.training_data import batch_prompts

    items = [
        {k: str(datalist.parent / v) for k, v in item.items()} for item in json.loads(datalist.read_text())["training"]
    ]
    vocabulary, labels, absent = load_vocabulary(), {1: "liver", 2: "spleen"}, ["pancreas", "brain", "heart"]
    dataset = SlicePromptDataset(items, labels, vocabulary, 64, 8, clip=2, absent=absent, negatives_per_sample=2)
    drawn = [dataset[i]["absent"].tolist() for i in range(len(dataset))]
    assert all(len(set(d)) == 2 and set(d) <= {0, 1, 2} for d in drawn) and len({tuple(d) for d in drawn}) > 1
    plain = SlicePromptDataset(items, labels, vocabulary, 64, 8, clip=2)
    assert "absent" not in plain[0] and torch.equal(plain[3]["target"], dataset[3]["target"])  # same samples

    other = next(i for i, d in enumerate(drawn) if set(d) != set(drawn[0]))
    batch = torch.utils.data.default_collate([dataset[0], dataset[other]])
    prompts, targets, flags = batch_prompts(batch, ["liver", "spleen"], absent, clicks=True)
    extra = sorted(set(drawn[0]) | set(drawn[other]))
    assert prompts == ["liver", "spleen", *[absent[a] for a in extra]]  # both samples' draws, once each
    assert targets.shape[2] == len(prompts) and not targets[:, :, 2:].any()
    assert torch.equal(targets[:, :, :2], batch["target"])
    assert flags["valid"][:, 2:].all()  # absent from every image: a negative for both samples, whoever drew it
    assert torch.equal(flags["valid"][:, :2], batch["valid"])
    assert not flags["annotated"][:, 2:].any()  # "not here" prompts are never clicked

    some = SlicePromptDataset(
        items, labels, vocabulary, 64, 40, absent=absent, negatives_per_sample=1, negative_fraction=0.25
    )
    picks = [some[i]["absent"].tolist() for i in range(len(some))]
    assert 4 <= sum(p != [-1] for p in picks) <= 16  # about a quarter of 40 samples draw one
    batch = torch.utils.data.default_collate([some[i] for i in range(len(some)) if picks[i] == [-1]][:2])
    prompts, targets, flags = batch_prompts(batch, ["liver", "spleen"], absent, clicks=False)
    assert prompts == ["liver", "spleen"] and targets.shape[2] == 2 and flags["valid"].shape[1] == 2  # none drawn
    with pytest.raises(ValueError, match="also training labels"):
        SlicePromptDataset(items, labels, vocabulary, 64, 1, absent=["hepatic parenchyma"])
    with pytest.raises(ValueError, match="negative_fraction"):
        SlicePromptDataset(items, labels, vocabulary, 64, 1, absent=absent, negative_fraction=0)


def test_phantom_absent_labels_leave_out_what_a_phantom_shows() -> None:
    from scripts.phantom_dataset import absent_labels

    names = [entry.name for entry in load_vocabulary()]
    absent = absent_labels(names)
    assert len(absent) == len(names) - 8 and "pancreas" in absent and "brain" in absent
    assert not {"liver", "aorta", "kidneys", "spinal cord"} & set(absent)


def test_learning_rate_schedule() -> None:
    """Linear warm-up, then constant or cosine; a function of the iteration alone, so resuming continues it."""
    from scripts.lr_schedule import LearningRateSchedule, lr_factor

    assert [lr_factor(i, 10, 2) for i in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(i, 10, 2, "cosine") for i in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] < 0.05
    assert all(a > b for a, b in zip(cosine[2:-1], cosine[3:], strict=True))
    with pytest.raises(ValueError, match="Unknown lr_schedule 'step'"):
        LearningRateSchedule(10, 0, "step")
    with pytest.raises(ValueError, match="warmup_steps must be between 0 and max_steps"):
        LearningRateSchedule(10, 11)


def test_a_run_stopped_mid_schedule_resumes_its_learning_rates(tmp_path: Path) -> None:
    """A run stopped where the cosine schedule is below its base rate, then resumed with the same ``max_steps``
    (train.json's handler order: the state is restored before the schedule attaches), continues the rates of the
    run that was not stopped; the restored optimiser's scheduled rate was once taken as the base."""
    from ignite.engine import Engine, Events

    from scripts.lr_schedule import LearningRateSchedule
    from scripts.training import TrainingState

    def run(folder: Path, resume: str = "", stop_at: int | None = None) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
        rates = []

        def step(engine: Engine, batch: object) -> None:
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()

        engine = Engine(step)
        engine.network, engine.optimizer = model, optimizer
        engine.state.max_epochs, engine.state.epoch_length = 1, 10  # as MONAI's workflow sets them
        TrainingState(str(folder), "full", 10, every=1, resume=resume).attach(engine)
        LearningRateSchedule(10, 2, "cosine").attach(engine)
        if stop_at:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
        engine.run(range(10))
        return rates

    straight = run(tmp_path / "straight")
    first = run(tmp_path / "stopped", stop_at=5)
    resumed = run(tmp_path / "stopped", resume=str(tmp_path / "stopped" / "train_state.pt"))
    assert first == straight[:5] and straight[4] < 1.0
    np.testing.assert_allclose(resumed, straight[5:], rtol=1e-6)


def test_full_mode_from_a_detector_only_checkpoint_saves_no_tracker(tmp_path: Path) -> None:
    """Started from Medical SAM3's detector-only file the tracker is neither loaded nor trained: a full-mode save
    that held its random weights loaded back as a model that follows clicks."""
    from scripts.checkpoint import TRACKER_PREFIXES, load_checkpoint, save_checkpoint
    from scripts.training import trained_state_dict

    source = tiny_model(seed=3)
    detector = {k: v for k, v in source.state_dict().items() if not k.startswith(TRACKER_PREFIXES)}
    torch.save({"model": {k.removeprefix("detector."): v for k, v in detector.items()}}, tmp_path / "detector.pt")
    model = tiny_model()
    assert not load_checkpoint(model, tmp_path / "detector.pt").interactive
    model.interactive = False  # as prepare_network sets it
    saved = trained_state_dict(model, "full")
    assert saved and not any(k.startswith(TRACKER_PREFIXES) for k in saved)
    save_checkpoint(model, tmp_path / "fine_tuned.pt", saved)
    assert not load_checkpoint(tiny_model(), tmp_path / "fine_tuned.pt").interactive
    assert any(k.startswith(TRACKER_PREFIXES) for k in trained_state_dict(tiny_model(), "full"))  # a full model: all


def test_resuming_restores_this_devices_random_stream_only(tmp_path: Path, monkeypatch) -> None:
    """A state saved on a machine with more GPUs than this one: every saved CUDA stream was restored by index
    (an IndexError here); now this process's device takes its own, or the first when it has none."""
    from types import SimpleNamespace

    from scripts.training import TrainingState

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    streams = [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]
    saved = {"weights": model.state_dict(), "optimizer": optimizer.state_dict(), "best_dice": -1.0}
    saved["rng"] = {"torch": torch.get_rng_state(), "cuda": streams}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state[0])))
    for device, expected in ((1, 1), (3, 0)):
        monkeypatch.setattr(torch.cuda, "current_device", lambda device=device: device)
        engine = SimpleNamespace(network=model, optimizer=optimizer, state=SimpleNamespace(iteration=0))
        TrainingState(str(tmp_path), "full", 10)._restore(engine, saved)
        assert restored[-1] == expected


def test_labels_off_their_image_grid_are_refused(tmp_path: Path) -> None:
    """A label stored in another orientation with the same shape trained on a mirror image (Dice 0 against the
    right target); labels whose headers differ from the image's by float noise still train."""
    import nibabel as nib

    image, label = write_phantom(tmp_path, "case", shape=(24, 24, 6))
    stored = nib.load(label)
    flipped = nib.Nifti1Image(np.asarray(stored.dataobj)[::-1].copy(), np.diag([-1.0, 1.0, 1.0, 1.0]) @ stored.affine)
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    noisy = stored.affine.copy()
    noisy[:3, 3] += 0.01  # mm: float noise of another writer
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj), noisy), tmp_path / "noisy.nii.gz")
    vocabulary = load_vocabulary()
    with pytest.raises(ValueError, match="flipped.nii.gz: The label is not on its image's grid"):
        SlicePromptDataset(
            [{"image": str(image), "label": str(tmp_path / "flipped.nii.gz")}], {1: "liver"}, vocabulary, 64, 1
        )
    noisy_item = {"image": str(image), "label": str(tmp_path / "noisy.nii.gz")}
    assert len(SlicePromptDataset([noisy_item], {1: "liver"}, vocabulary, 64, 2)) == 2


def test_items_with_their_own_labels(datalist: Path) -> None:
    """An item annotating only the spleen, as value 1: spleen targets come from value 1, liver is not a negative."""
    training = json.loads(datalist.read_text())["training"]
    items = [{k: str(datalist.parent / v) for k, v in item.items()} for item in training]
    items[1]["labels"] = {"2": "spleen"}
    vocabulary = load_vocabulary()
    dataset = SlicePromptDataset(items[1:], {1: "liver", 2: "spleen"}, vocabulary, 64, 8, positive_fraction=1.0)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["valid"].tolist() == [0.0, 1.0] and not sample["target"][:, 0].any()
    assert any(dataset[i]["target"][:, 1].any() for i in range(len(dataset)))
    with pytest.raises(ValueError, match="not among the training labels"):
        SlicePromptDataset([{**items[0], "labels": {"1": "aorta"}}], {1: "liver"}, vocabulary, 64, 1)
    # Two values sharing a name (two Slicer segments "liver") are one target.
    both = SlicePromptDataset([{**items[0], "labels": {"1": "liver", "2": "liver"}}], {1: "liver"}, vocabulary, 64, 6)
    sample = next(both[i] for i in range(6) if both[i]["target"].any())
    assert sample["target"].shape[1] == 1 and sample["valid"].tolist() == [1.0]
    with pytest.raises(ValueError, match="'labels' map is empty"):
        SlicePromptDataset([{**items[0], "labels": {}}], {1: "liver"}, vocabulary, 64, 1)
    # Offsets: sample i of a dataset starting at index k is sample k + i of one starting at 0.
    offset = SlicePromptDataset(items, {1: "liver", 2: "spleen"}, vocabulary, 64, 4, first_index=3)
    whole = SlicePromptDataset(items, {1: "liver", 2: "spleen"}, vocabulary, 64, 8)
    torch.testing.assert_close(offset[1]["image"], whole[4]["image"])
    # Without a dataset-level map, the training labels are the items' names.
    path = datalist.parent / "own_labels.json"
    path.write_text(
        json.dumps(
            {
                "training": [
                    {**training[0], "labels": {"1": "liver"}},
                    {**training[1], "labels": {"3": "aorta", "1": "liver"}},
                ]
            }
        )
    )
    assert dataset_labels(None, path) == {1: "liver", 2: "aorta"}
    assert dataset_labels("null", path) == dataset_labels("{'1': 'liver', '2': 'aorta'}", path)
    with pytest.raises(ValueError, match="--labels must map label values to names"):
        dataset_labels("liver", path)  # was read as "none given": the datalist's names, silently
    path.write_text(json.dumps({"training": [{**training[0], "labels": {"1": "liver"}}, training[1]]}))
    with pytest.raises(ValueError, match="have no 'labels' map"):
        dataset_labels(None, path)


def test_absent_labels_as_the_command_line_passes_them() -> None:
    """``--absent_labels pancreas`` arrives as a string: it trained seven one-letter prompts as "not here"."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "train.json"))
    for given, expected in (("pancreas", ["pancreas"]), ("['pancreas', 'brain']", ["pancreas", "brain"]), ([], [])):
        parser["absent_labels"] = given
        assert parser.get_parsed_content("absent_label_list", lazy=False) == expected


def test_bad_training_and_validation_items_are_refused_before_training(datalist: Path, tmp_path: Path) -> None:
    """Validation items were first read at the first validation, after training time, and a crash there lost the
    resume state; an item without a label was a bare KeyError, ``max_steps`` 0 an empty file name."""
    from scripts.training import TrainingState
    from scripts.validation import TextPromptValidation

    items = [
        {k: str(datalist.parent / v) for k, v in item.items()} for item in json.loads(datalist.read_text())["training"]
    ]
    vocabulary, labels = load_vocabulary(), {1: "liver", 2: "spleen"}
    bad = {
        "has no 'label' to score against": {"image": items[0]["image"]},
        "Validation files not found: /nowhere/label.nii.gz": {**items[0], "label": "/nowhere/label.nii.gz"},
        "names no labels": {**items[0], "labels": {}},
        "Duplicate text prompts": {**items[0], "labels": {"1": "liver", "2": "Liver"}},
    }
    for message, item in bad.items():
        with pytest.raises(ValueError, match=message):
            TextPromptValidation([item], labels, vocabulary, str(tmp_path), "full", every=1)
    with pytest.raises(ValueError, match="has no 'label' map to learn from"):
        SlicePromptDataset([{"image": items[0]["image"]}], labels, vocabulary, 64, 1)
    for steps in (0, -5):
        with pytest.raises(ValueError, match=f"max_steps must be at least 1, got {steps}"):
            TrainingState(str(tmp_path), "full", steps)


def test_loss_ignores_pairs_the_sample_does_not_annotate() -> None:
    outputs = _outputs()
    targets = torch.zeros(2, 32, 32)
    targets[1, 8:24, 8:24] = 1
    only_first = TextPromptLoss()(outputs, targets, valid=torch.tensor([1.0, 0.0]))
    assert float(only_first["mask"]) == 0.0  # the annotated pair is empty; the present one is ignored
    torch.testing.assert_close(only_first["presence"], TextPromptLoss()(_outputs(1), targets[:1])["presence"])
    nothing = TextPromptLoss()(outputs, targets, valid=torch.zeros(2))
    assert float(nothing["loss"]) == 0.0


def test_param_groups_follow_the_recipe() -> None:
    model = tiny_model()
    groups = param_groups(model, lr_backbone=1e-4, lr_decoder=1e-3, layer_decay=0.5, weight_decay=0.05)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs[-1] == 1e-3 and 1e-4 * 0.5**3 in lrs  # patch embedding: 3 layers below the top of a 2-block ViT
    assert any(g["weight_decay"] == 0.0 for g in groups) and any(g["weight_decay"] == 0.05 for g in groups)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameters"):
        param_groups(model)


def _train(datalist: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundle/configs/train.json")]
    command += [
        "--datalist",
        str(datalist),
        "--output_dir",
        str(output),
        "--model_size",
        "tiny",
        "--ckpt_path",
        "random",
    ]
    # Tracking clips of 2 slices: every part of the step runs at a fraction of the default 8-slice clips' cost.
    command += ["--device_name", "cpu", "--tracking_clip", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_config_lowers_the_loss(datalist: Path, tmp_path: Path) -> None:
    result = _train(
        datalist,
        tmp_path,
        "--mode",
        "full",
        "--max_steps",
        "60",
        "--batch_size",
        "2",
        "--lr_backbone",
        "0.001",
        "--lr_decoder",
        "0.001",
        "--click_rounds",
        "0",  # the text loss alone (the tracker's clicks are tested in test_click_training.py)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [
        float(line.rsplit("train_loss: ", 1)[1].split()[0])
        for line in result.stdout.splitlines() + result.stderr.splitlines()
        if "train_loss: " in line
    ]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["format"] == "medsam3" and saved["meta"]["mode"] == "full" and saved["meta"]["iteration"] == 60


@pytest.mark.slow
def test_lora_checkpoint_is_small_and_reloads_on_the_base(datalist: Path, tmp_path: Path) -> None:
    from scripts.adapters import HEAD_PREFIXES, configure_adaptation, load_adaptation

    result = _train(datalist, tmp_path, "--mode", "lora", "--max_steps", "4", "--batch_size", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["meta"]["mode"] == "lora"
    # LoRA and the heads (train_heads, the default: decoder, mask heads, the whole tracker): no encoder weights.
    assert all("lora_" in key or key.startswith(HEAD_PREFIXES) for key in saved["state_dict"])
    assert any("lora_" in key for key in saved["state_dict"]) and any(
        "sam_mask_decoder" in k for k in saved["state_dict"]
    )
    base = tiny_model(seed=0)  # the random-weight base the run started from (build seed 0)
    full_size = sum(v.numel() for v in base.state_dict().values())
    # Tiny's tracker is large for its size; base: 4.5M LoRA + 26.8M head parameters = 3.6% (README).
    assert sum(v.numel() for v in saved["state_dict"].values()) < 0.3 * full_size
    assert not any(key.startswith("detector.backbone.") for key in saved["state_dict"] if "lora_" not in key)
    configure_adaptation(base, "lora", heads=True)
    load_adaptation(base, saved["state_dict"])
    trained = [key for key, value in saved["state_dict"].items() if "lora_B" in key and value.abs().sum() > 0]
    assert trained  # the low-rank updates moved away from their zero start
    # What users do: the file on top of the base checkpoint (inference.json --adapter_path), same outputs.
    reloaded = load_network(tiny_model(seed=0), "random", adapter_path=str(tmp_path / "model_final.pt"))
    assert reloaded.adaptation == {"mode": "lora", "rank": 8, "alpha": 16.0, "heads": True}
    base.eval(), reloaded.eval()
    for key, value in model_outputs(base, with_clicks=False).items():
        np.testing.assert_allclose(model_outputs(reloaded, with_clicks=False)[key], value, atol=1e-5)
    with pytest.raises(CheckpointError, match="trained with adaptation"):
        load_network(adapted_tiny("adapter3d"), "random", adapter_path=str(tmp_path / "model_final.pt"))
    with pytest.raises(ValueError, match="continue them with --mode lora"):
        prepare_network(tiny_model(), "random", "", "adapter3d", adapter_path=str(tmp_path / "model_final.pt"))
    with pytest.raises(ValueError, match="trained with train_heads=True"):
        prepare_network(tiny_model(), "random", "", "lora", str(tmp_path / "model_final.pt"), heads=False)


def adapted_tiny(mode: str):
    from scripts.adapters import configure_adaptation

    model = tiny_model()
    configure_adaptation(model, mode)
    return model


@pytest.mark.slow
def test_resume_continues_where_it_stopped(datalist: Path, tmp_path: Path) -> None:
    """6 steps straight and 3 steps + resume to 6 end with the same weights (samples, optimiser, RNG and the
    learning-rate schedule restored)."""
    common = ["--mode", "adapter3d", "--batch_size", "1", "--val_every", "0", "--lr_backbone", "0.01"]
    common += ["--lr_schedule", "cosine", "--warmup_steps", "2"]  # the schedule continues too
    straight = _train(datalist, tmp_path / "straight", *common, "--max_steps", "6")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _train(datalist, tmp_path / "resumed", *common, "--max_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "resumed" / "train_state.pt"
    resumed = _train(datalist, tmp_path / "resumed", *common, "--max_steps", "6", "--resume", str(state))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Resumed at iteration 3" in log and "Iter: 4/6" in log and "Iter: 1/6" not in log
    final = [torch.load(tmp_path / run / "model_final.pt", weights_only=True) for run in ("straight", "resumed")]
    assert final[0]["meta"]["iteration"] == final[1]["meta"]["iteration"] == 6
    for key, value in final[0]["state_dict"].items():
        torch.testing.assert_close(final[1]["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    halfway = torch.load(state, weights_only=True)  # the 6-step state now; the 3-step weights differed from it
    assert halfway["iteration"] == 6
    again = _train(datalist, tmp_path / "resumed", *common, "--max_steps", "6", "--resume", str(state))
    assert again.returncode != 0 and "give more than 6 to train further" in again.stderr
    wrong = _train(datalist, tmp_path / "other", "--mode", "lora", "--max_steps", "9", "--resume", str(state))
    assert wrong.returncode != 0 and "resume it with --mode adapter3d" in wrong.stderr


@pytest.mark.slow
def test_mlflow_tracking_logs_the_loss(datalist: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    result = _train(
        datalist, tmp_path, "--mode", "lora", "--max_steps", "3", "--val_every", "0", "--tracking", "mlflow"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3] and all(np.isfinite(m.value) for m in history)


@pytest.mark.slow
def test_training_raises_held_out_dice(datalist: Path, tmp_path: Path) -> None:
    """Untrained (random weights) the tiny model finds nothing (Dice 0, measured); 80 steps teach it the liver."""
    args = ["--mode", "full", "--max_steps", "80", "--batch_size", "2", "--val_every", "40", "--click_rounds", "0"]
    result = _train(datalist, tmp_path, *args, "--lr_backbone", "0.001", "--lr_decoder", "0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    dices = [
        float(line.split("Validation mean Dice ")[1].split()[0])
        for line in log.splitlines()
        if "Validation mean Dice" in line
    ]
    assert len(dices) == 2 and max(dices) > 0.15, dices
    best = torch.load(tmp_path / "model_best.pt", map_location="cpu", weights_only=True)
    assert best["meta"]["iteration"] in (40, 80)


@pytest.mark.slow
def test_multi_gpu_config_runs_under_torchrun(datalist: Path, tmp_path: Path) -> None:
    """The DDP override on CPU (gloo, 2 processes): each rank trains on its own shard, rank 0 saves once."""
    configs = str([str(REPO / "bundle/configs/train.json"), str(REPO / "bundle/configs/multi_gpu_train.json")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571"]
    command = [*torchrun, "-m", "monai.bundle", "run", "--config_file", configs, "--datalist", str(datalist)]
    command += ["--output_dir", str(tmp_path), "--model_size", "tiny", "--ckpt_path", "random", "--mode", "lora"]
    command += ["--max_steps", "3", "--val_every", "0", "--tracking_clip", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("Iter: 3/3") == 1  # rank 0 logs; rank 1 trains silently
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["meta"]["mode"] == "lora" and saved["meta"]["iteration"] == 3
    assert any("lora_" in k for k in saved["state_dict"]) and saved["meta"]["adaptation"]["heads"] is True


@pytest.mark.slow
def test_the_demo_recipe_runs_with_its_not_here_labels(tmp_path: Path) -> None:
    """``demo_train.json`` as the README runs it, cut to a few steps on a few phantoms, every sample drawing an absent
    label: its absent labels (the vocabulary less what a phantom shows) resolve and train with the rest."""
    configs = str([str(REPO / "bundle/configs/train.json"), str(REPO / "bundle/configs/demo_train.json")])
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--output_dir", str(tmp_path)]
    command += ["--demo_cases", "2", "--max_steps", "4", "--warmup_steps", "1", "--val_every", "0"]
    command += ["--negative_fraction", "1.0", "--device_name", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["meta"]["iteration"] == 4 and saved["meta"]["mode"] == "full"
    assert (tmp_path / "phantoms" / "datalist.json").is_file()


def test_train_heads_flag_from_the_command_line(tmp_path: Path) -> None:
    """``monai.bundle run`` passes ``--train_heads false`` as the string "false"."""
    adapters_only = prepare_network(tiny_model(), "random", "", "lora", heads="false")
    assert adapters_only.adaptation["heads"] is False
    assert all("lora_" in n for n, p in adapters_only.named_parameters() if p.requires_grad)
    assert prepare_network(tiny_model(), "random", "", "lora", heads="True").adaptation["heads"] is True
    with pytest.raises(ValueError, match="train_heads must be true or false, got 'maybe'"):
        prepare_network(tiny_model(), "random", "", "lora", heads="maybe")
    # A detector-only checkpoint: the heads would save an untrained tracker over the real one later.
    detector_only = tmp_path / "detector.pt"
    state = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith(TRACKER_PREFIXES)}
    torch.save(state, detector_only)
    with pytest.raises(ValueError, match="no tracker weights"):
        prepare_network(tiny_model(), str(detector_only), "", "lora")
    assert not prepare_network(tiny_model(), str(detector_only), "", "lora", heads=False).interactive


def test_samples_use_their_labels_intensity_preset_as_inference_does(datalist: Path) -> None:
    """Liver (abdomen window) and vertebrae (bone window) never share a sample; each sample's slices are exactly
    what inference prepares for its label (``scripts.slices``), and tracker clips start on a slice showing it."""
    import torch.nn.functional as F

    from scripts.image_io import read_image
    from scripts.orientation import SliceView
    from scripts.slices import prepare_slices

    item = {k: str(datalist.parent / v) for k, v in json.loads(datalist.read_text())["training"][0].items()}
    vocabulary = load_vocabulary()
    dataset = SlicePromptDataset(
        [item], {1: "liver", 5: "vertebrae"}, vocabulary, 40, 12, clip=4, anchor_first=True, positive_fraction=1.0,
        augment=False,
    )  # fmt: skip
    image = read_image(item["image"])
    prepared = {
        name: torch.from_numpy(prepare_slices(image, SliceView.for_volume(image), vocabulary.preset_for(name, "CT")))
        for name in ("liver", "vertebrae")
    }
    seen = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        valid = sample["valid"].tolist()
        assert valid in ([1.0, 0.0], [0.0, 1.0])
        channel = valid.index(1.0)
        name = ("liver", "vertebrae")[channel]
        seen.add(name)
        assert sample["target"][0, channel].any()  # the clip starts on a slice showing the structure
        grey = (sample["image"][:, 0] + 1) / 2  # back to [0, 1]
        matches = [
            torch.allclose(grey, F.interpolate(prepared[name][rows][:, None], size=(40, 40), mode="bilinear")[:, 0],
                           atol=2e-3)
            for rows in _clips(prepared[name].shape[0], 4)
        ]  # fmt: skip
        assert any(matches), (index, name)
    assert seen == {"liver", "vertebrae"}


def _clips(depth: int, length: int) -> list[torch.Tensor]:
    """Every clip of ``length`` consecutive slices up or down a volume of ``depth`` (clamped at its ends)."""
    steps = torch.arange(length)
    return [(start + sign * steps).clamp(0, depth - 1) for start in range(depth) for sign in (1, -1)]


@pytest.mark.parametrize(("annotated", "clicked_pairs"), [([1.0, 1.0], [0, 1]), ([0.0, 1.0], [0])])
def test_clicks_train_on_every_annotated_structure(annotated: list[float], clicked_pairs: list[int]) -> None:
    """A bone-window sample trains the vertebrae's text prompt only, but its clicks go to every structure the item
    annotates: one structure per slice would teach the tracker to ignore where the click is."""
    from types import SimpleNamespace

    from scripts.click_training import ClickSimulation

    model = tiny_model()
    size = model.image_size
    target = torch.zeros(1, 1, 2, size, size)
    target[0, 0, 0, 20:100, 20:100] = 1  # liver (another preset: not a text prompt of this sample)
    target[0, 0, 1, 140:200, 140:200] = 1  # vertebrae
    batch = {
        "image": torch.rand(1, 1, 3, size, size) * 2 - 1,
        "target": target,
        "valid": torch.tensor([[0.0, 1.0]]),
        "annotated": torch.tensor([annotated]),
    }
    outputs: dict = {}
    model.register_forward_hook(lambda module, args, out: outputs.update(out))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = SimpleNamespace(
        network=model, state=SimpleNamespace(device=torch.device("cpu"), metrics={}), optimizer=optimizer
    )
    simulation = ClickSimulation(rounds=1, box_probability=0.0, text_probability=0.0, second_prompt_probability=0.0)
    PromptStep(["liver", "vertebrae"], clicks=simulation, amp=False)(engine, batch)
    assert outputs["click_rounds"][0]["pairs"].tolist() == clicked_pairs


def test_keeping_activations_gives_the_same_gradients_without_recomputing(monkeypatch) -> None:
    """``activation_checkpointing: false`` (the demo recipe): no sam3 block goes through torch's checkpoint, and
    the gradients are those of the checkpointed step (dropout included: same seed, same masks)."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    monkeypatch.setattr(sam3.model.text_encoder_ve, "checkpoint", counted)
    size = tiny_model().image_size
    slices = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    def gradients(keep: bool) -> tuple[int, dict[str, torch.Tensor]]:
        model = tiny_model().train()
        calls.clear()
        torch.manual_seed(1)
        with device_fallbacks(torch.device("cpu")), keep_activations(keep):
            outputs = model(slices, ["liver", "spleen"])
        loss = outputs["pred_masks"].sigmoid().mean() + outputs["pred_logits"].sigmoid().mean()
        loss.backward()
        return len(calls), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    checkpointed_calls, checkpointed = gradients(keep=False)
    kept_calls, kept = gradients(keep=True)
    assert checkpointed_calls > 0 and kept_calls == 0
    assert kept.keys() == checkpointed.keys() and len(kept) > 100
    for name, grad in kept.items():
        torch.testing.assert_close(grad, checkpointed[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sam3.model.text_encoder_ve.checkpoint is counted  # the references are put back


def test_activation_checkpointing_flag_from_the_command_line() -> None:
    assert PromptStep(["liver"], activation_checkpointing="false").activation_checkpointing is False
    assert PromptStep(["liver"]).activation_checkpointing is True
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false"):
        PromptStep(["liver"], activation_checkpointing="sometimes")
