"""The image-folder data sets and ``dg train`` against the real torchvision (``make test-vision``;
skipped where torchvision does not import): files listed and decoded as torchvision's
``ImageFolder`` does, and ``torchsage dg train`` run as a user runs it, in its own process, on a
generated PACS-shaped folder with the real transforms, loader worker processes and a ResNet whose
weights come from a file the test writes (through torch's cache, and through ``pretrained_path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchsage.dg.batches import infinite_batches
from torchsage.dg.images import IMAGE_DATASETS, ImageDataset, eval_transform
from torchvision_support import IMAGENET_FILES, imagenet_like_state, require_torchvision

torchvision = require_torchvision()
pytestmark = pytest.mark.torchvision
Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[2]
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")  # PACS's 7


def write_pacs(data_dir: Path, per_class: int = 2) -> Path:
    """A PACS-shaped folder: its 4 domains x 7 classes, ``per_class`` images each, of varied sizes
    and Pillow modes (RGB JPEG; greyscale, palette and RGBA PNG), one in a nested folder and one
    with an upper-case extension, as real downloads have."""
    rng = np.random.default_rng(0)
    for domain in IMAGE_DATASETS["PACS"]:
        for c in PACS_CLASSES:
            folder = data_dir / "PACS" / domain / c
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = (int(v) for v in rng.integers(20, 48, 2))
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
                mode = ("RGB", "L", "P", "RGBA")[(k + len(c)) % 4]
                name = f"pic_{k}.{'jpg' if mode == 'RGB' else 'png'}"
                if mode == "P":
                    image = image.quantize(16)
                elif mode != "RGB":
                    image = image.convert(mode)
                target = folder / "more" if k == 1 and c == "dog" else folder
                target.mkdir(exist_ok=True)
                image.save(target / (name.upper() if c == "house" else name))
    return data_dir


def test_environments_list_and_decode_files_as_torchvisions_image_folder(tmp_path):
    data = ImageDataset("PACS", write_pacs(tmp_path / "data"), image_size=24)
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize((24, 24)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    for env in data.environments:
        reference = torchvision.datasets.ImageFolder(str(env.root), transform=transform)
        assert reference.classes == data.classes == list(PACS_CLASSES)
        assert [(Path(p), y) for p, y in reference.samples] == env.samples
        for i in range(len(env)):  # Pillow's RGB conversion, resize and ImageNet normalisation alike
            (x, y), (x_ref, y_ref) = env[i], reference[i]
            assert y == y_ref
            torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)  # float32 ulps of values below 3
    assert torch.equal(eval_transform(data.environments[0].load(0), 24), data.environments[0][0][0])


def dg_train(tmp_path: Path, arch: str, hparams: dict, env: dict | None = None, **extra: str) -> Path:
    """``python -m torchsage dg train`` on the generated PACS folder, in a process of its own."""
    out = tmp_path / f"run_{arch}"
    options = {"--steps": "3", "--checkpoint-freq": "2", "--num-workers": "2", "--device": "cpu", **extra}
    argv = [sys.executable, "-m", "torchsage", "dg", "train", "--dataset", "PACS", "--algorithm", "SAGE"]
    argv += ["--test-envs", "3", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)]
    argv += [*(x for item in options.items() for x in item), "--hparams", json.dumps(hparams)]
    argv += ["--save-model", "--no-progress", "--threads", "1"]
    environment = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_dg_train_on_a_pacs_folder_with_workers_and_a_resnet_from_a_weights_file(arch, tmp_path):
    write_pacs(tmp_path / "data")
    state = imagenet_like_state(torchvision, arch)
    hparams = {"backbone": arch, "batch_size": 2, "image_size": 32}  # augmentation on: PACS's default
    if arch == "resnet18":  # the default "pretrained": "imagenet", read from torch's cache
        cache = tmp_path / "torch_home" / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        torch.save(state, cache / IMAGENET_FILES[arch])
        out = dg_train(tmp_path, arch, hparams, env={"TORCH_HOME": str(tmp_path / "torch_home")})
    else:  # a local file
        torch.save(state, tmp_path / "weights.pth")
        out = dg_train(tmp_path, arch, {**hparams, "pretrained_path": str(tmp_path / "weights.pth")})
    assert (out / "done").exists()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    last = records[-1]
    assert last["args"]["device"] == "cpu" and last["args"]["num_workers"] == 2
    assert last["hparams"]["backbone"] == arch and last["hparams"]["data_augmentation"] is True
    assert last["hparams"]["freeze_bn"] is True and np.isfinite(last["loss"]) and last["disagreement"] > 0
    for i in range(4):  # every environment evaluated, on its in and out parts
        for split in ("in", "out"):
            assert 0.0 <= last[f"env{i}_{split}_acc"] <= 1.0
    # the saved network: BatchNorm statistics still the file's (frozen), convolutions trained from it
    model = torch.load(out / "model.pt", weights_only=True)["model"]
    for key, value in state.items():
        if "running" in key:
            assert torch.equal(model[f"0.network.{key}"], value), key
    conv = model["0.network.conv1.weight"]
    assert not torch.equal(conv, state["conv1.weight"])
    assert float((conv - state["conv1.weight"]).norm() / state["conv1.weight"].norm()) < 0.1


def _pinned(batch: tuple) -> bool:
    return all(t.is_pinned() for t in batch if isinstance(t, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_loaders_pin_memory_on_a_gpu_and_dg_train_runs_there(tmp_path):
    data = ImageDataset("PACS", write_pacs(tmp_path / "data"), augment=True, image_size=32)
    envs = [data.training_environment(i) for i in range(3)]
    assert _pinned(next(infinite_batches(envs[0], 2, seed=0, num_workers=2, pin_memory=True)))
    torch.save(imagenet_like_state(torchvision, "resnet18"), tmp_path / "weights.pth")
    hparams = {"backbone": "resnet18", "batch_size": 2, "image_size": 32}
    hparams["pretrained_path"] = str(tmp_path / "weights.pth")
    out = dg_train(tmp_path, "resnet18", hparams, **{"--device": "cuda"})
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["args"]["device"].startswith("cuda")
