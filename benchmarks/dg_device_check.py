"""Section 4 of ``benchmarks/gpu_check.py``: ``torchsage dg train`` on a GPU, end to end.

On a generated PACS-shaped image folder (4 domains x 2 classes of random JPEGs, nothing to
download) it runs

1. **devices**: a short in-process ``dg train`` of ERM and SAGE, recording the device of every
   training and evaluation batch and, after every step, of the parameters, buffers, optimizer state
   and SAGE's noise generator (:func:`torchsage.dg.train.tensor_devices`): each must be the one
   requested, nothing left on the CPU;
2. **dg_train**: the documented command line, as a user runs it, for ERM and SAGE::

       torchsage dg train --dataset PACS --algorithm SAGE --test-envs 0 --data-dir DATA \\
         --output-dir RUN --device cuda --steps 30 --checkpoint-freq 10 --num-workers 4 \\
         --hparams '{"backbone": "resnet18", "pretrained": null, "batch_size": 32}'

   reading back the recorded device, the seconds per step (after the first checkpoint) and the
   accuracies. ``pretrained`` is null because the GPU machine may have no network: the point is
   the device path, not the accuracy.

Run alone: ``python benchmarks/dg_device_check.py --device cuda`` (``--quick --device cpu
--backbone mnist_cnn`` is the smoke run on a machine without GPU or torchvision).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SRC = Path(__file__).resolve().parent.parent / "src"
try:
    import torchsage  # noqa: F401
except ImportError:  # a checkout that is not installed: use its sources
    sys.path.insert(0, str(SRC))

CLASSES = ("dog", "house")


def make_image_folder(root: Path, images: int, size: int, seed: int = 0) -> Path:
    """``root/PACS/<domain>/<class>/<k>.jpg``: random RGB images, ``images`` per class."""
    from PIL import Image

    from torchsage.dg.images import IMAGE_DATASETS

    rng = np.random.default_rng(seed)
    for domain in IMAGE_DATASETS["PACS"]:
        for c in CLASSES:
            folder = root / "PACS" / domain / c
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(images):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{k}.jpg", quality=90)
    return root


def _hparams(backbone: str, batch: int, image_size: int) -> dict[str, Any]:
    hp: dict[str, Any] = {"backbone": backbone, "batch_size": batch, "image_size": image_size}
    if backbone != "mnist_cnn":
        hp["pretrained"] = None  # no network needed
    else:
        hp["cnn_width"] = 16
    return hp


def device_audit(data: Path, device: str, backbone: str, batch: int, image_size: int) -> list[dict]:
    """Trains ERM and SAGE for 2 steps in this process and records every device seen."""
    from torchsage.dg.algorithms import ALGORITHMS
    from torchsage.dg.train import TrainArgs, tensor_devices, train

    rows = []
    for name in ("ERM", "SAGE"):
        cls = ALGORITHMS[name]
        seen: dict[str, set[str]] = {"batches": set(), "evaluation batches": set()}
        update, predict = cls.update, cls.predict

        def spied_update(self, minibatches, step, update=update, seen=seen):
            seen["batches"].update(str(t.device) for b in minibatches for t in b)
            out = update(self, minibatches, step)
            for key, devices in tensor_devices(self).items():
                seen.setdefault(key, set()).update(str(d) for d in devices)
            return out

        def spied_predict(self, x, predict=predict, seen=seen):
            if not self.training:
                seen["evaluation batches"].add(str(x.device))
            return predict(self, x)

        cls.update, cls.predict = spied_update, spied_predict
        try:
            with tempfile.TemporaryDirectory() as out:
                train(
                    TrainArgs(
                        "PACS",
                        name,
                        [0],
                        out,
                        data_dir=str(data),
                        steps=2,
                        checkpoint_freq=1,
                        hparams=json.dumps(_hparams(backbone, batch, image_size)),
                        progress=False,
                        num_workers=2,
                        device=device,
                    )
                )
        finally:
            cls.update, cls.predict = update, predict
        want = str(torch.device(device)) if device != "cuda" else f"cuda:{torch.cuda.current_device()}"
        found = {k: sorted(v) for k, v in seen.items() if v}
        ok = all(v == [want] for v in found.values())
        rows.append({"algorithm": name, "requested": want, "found": found, "ok": ok})
    return rows


def cli_runs(
    data: Path, device: str, backbone: str, batch: int, image_size: int, steps: int, workers: int
) -> list[dict]:
    """The documented ``dg train`` command for ERM and SAGE; figures read from its records."""
    rows = []
    freq = max(1, steps // 3)
    for name in ("ERM", "SAGE"):
        with tempfile.TemporaryDirectory() as out:
            argv = [sys.executable, "-m", "torchsage", "dg", "train", "--dataset", "PACS"]
            argv += ["--algorithm", name, "--test-envs", "0", "--data-dir", str(data), "--output-dir", out]
            argv += ["--device", device, "--steps", str(steps), "--checkpoint-freq", str(freq)]
            argv += ["--num-workers", str(workers), "--no-progress"]
            argv += ["--hparams", json.dumps(_hparams(backbone, batch, image_size))]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
            start = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: dg train exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
            records = [json.loads(line) for line in Path(out, "results.jsonl").read_text().splitlines()]
        first, last = records[0], records[-1]
        # step_time is cumulative seconds per step; without the first (compilation, cudnn tuning)
        later = (last["step_time"] * (last["step"] + 1) - first["step_time"] * (first["step"] + 1)) / max(
            last["step"] - first["step"], 1
        )
        rows.append(
            {
                "algorithm": name,
                "device": last["args"]["device"],
                "steps": steps,
                "wall_s": round(wall, 1),
                "s_per_step_after_first_checkpoint": round(later, 4),
                "env0_in_acc": last["env0_in_acc"],
                "command": "python " + shlex.join(argv[1:]),
            }
        )
    return rows


def run(device: str, quick: bool, backbone: str = "resnet18", workers: int = 4) -> dict:
    """Both parts on a fresh image folder; prints markdown tables."""
    image_size, batch, images, steps = (32, 4, 6, 3) if quick else (224, 32, 40, 30)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_image_folder(Path(tmp), images, 64 if quick else 256)
        audit = device_audit(data, device, backbone, min(batch, 8), image_size)
        print(f"\n## dg train devices ({backbone}, {image_size}px)\n")
        print("| algorithm | requested | every tensor there | found |\n|---|---|---|---|")
        for r in audit:
            print(f"| {r['algorithm']} | {r['requested']} | {r['ok']} | {r['found']} |")
        runs = cli_runs(data, device, backbone, batch, image_size, steps, workers)
    print(f"\n## dg train, command line ({backbone}, {image_size}px, batch {batch} per domain, 3 domains)\n")
    print("| algorithm | device | steps | wall s | s/step after first checkpoint |\n|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['algorithm']} | {r['device']} | {r['steps']} | {r['wall_s']} | "
            f"{r['s_per_step_after_first_checkpoint']} |"
        )
    print(f"\ncommand: {runs[-1]['command']}")
    if not all(r["ok"] for r in audit):
        raise AssertionError(f"tensors off the requested device: {audit}")
    return {"devices": audit, "runs": runs}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50", "mnist_cnn"])
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    run(args.device, args.quick, args.backbone, args.num_workers)
