"""Fine-tuning: the loss and its matching, the slice sampler, optimiser groups, and train.json end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_model

from scripts.losses import TextPromptLoss
from scripts.phantom import write_phantom
from scripts.training import param_groups
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
    command += ["--device_name", "cpu", *args]
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
    from scripts.adapters import configure_adaptation, load_adaptation

    result = _train(datalist, tmp_path, "--mode", "lora", "--max_steps", "4", "--batch_size", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["meta"]["mode"] == "lora" and all("lora_" in key for key in saved["state_dict"])
    base = tiny_model(seed=0)  # the random-weight base the run started from (build seed 0)
    full_size = sum(v.numel() for v in base.state_dict().values())
    assert sum(v.numel() for v in saved["state_dict"].values()) < 0.05 * full_size
    configure_adaptation(base, "lora")
    load_adaptation(base, saved["state_dict"])
    trained = [key for key, value in saved["state_dict"].items() if "lora_B" in key and value.abs().sum() > 0]
    assert trained  # the low-rank updates moved away from their zero start


@pytest.mark.slow
def test_training_raises_held_out_dice(datalist: Path, tmp_path: Path) -> None:
    """Untrained (random weights) the tiny model finds nothing (Dice 0, measured); 80 steps teach it the liver."""
    args = ["--mode", "full", "--max_steps", "80", "--batch_size", "2", "--val_every", "40"]
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
    command += ["--max_steps", "3", "--val_every", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("Iter: 3/3") == 1  # rank 0 logs; rank 1 trains silently
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["meta"] == {"mode": "lora", "iteration": 3} and all("lora_" in k for k in saved["state_dict"])
