"""One test per row of docs/files.md: each kind of file torchsage reads, fed truncated, corrupt and
foreign copies. Each checks the one-line error (or, for run records, the one line per bad line)
and that nothing was written or changed: the files on disk, the model's weights, the optimizer."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import torchsage
from test_files import _CreatesFile, snapshot, truncated
from torchsage.cli import main
from torchsage.files import UnreadableFileError, safe_torch_load

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--hutchinson-samples", "2", "--lanczos-steps", "3", "--cg-max-iter", "3", "--no-progress"]


def one_line(text: str) -> str:
    assert text and "\n" not in text.strip() and "Traceback" not in text, repr(text)
    return text.strip()


def corrupt(good: Path, target: Path) -> Path:
    """The file with its last 64 bytes zeroed (a zip's central directory, a pickle's last opcodes)."""
    data = bytearray(good.read_bytes())
    data[-64:] = bytes(64)
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def dg_run(tmp_path_factory):
    from torchsage.dg.train import TrainArgs, train

    out = tmp_path_factory.mktemp("dg") / "run"
    train(TrainArgs(dataset="RotatedDigits", algorithm="ERM", test_envs=[0], output_dir=str(out), steps=2,
                    hparams='{"cnn_width": 8}', save_model=True, progress=False))  # fmt: skip
    return out


# -- run records -----------------------------------------------------------------------------------


def test_run_records(dg_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(dg_run, sweep / "good")
    shutil.copytree(dg_run, sweep / "damaged")
    (sweep / "damaged" / "model.pt").unlink()
    with open(sweep / "damaged" / "results.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00binary\n")  # corrupt: not UTF-8
        f.write(b'{"hello": "world"}\n')  # foreign: JSON, not a record
        f.write(b"[1, 2]\n")
        f.write(b'{"step": 9, "env0_in')  # truncated: the torn last line of a killed run
    before = snapshot(sweep)
    assert main(["dg", "report", str(sweep), "--plot", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("- damaged/results.jsonl: line")]
    n = len((sweep / "good" / "results.jsonl").read_text().splitlines())
    assert notes == [
        f"- damaged/results.jsonl: line {n + 1}: not UTF-8",
        f"- damaged/results.jsonl: line {n + 2}: no numeric 'step'",
        f"- damaged/results.jsonl: line {n + 3}: not a JSON object (list)",
        f"- damaged/results.jsonl: line {n + 4}: invalid JSON (Unterminated string starting at, torn write?)",
    ]
    assert snapshot(sweep) == before
    # a reader that needs every line whole (the study's pilot) stops at the first bad one
    from torchsage.study.pilot import train_accuracy_curve

    with pytest.raises(UnreadableFileError) as caught:
        train_accuracy_curve(sweep / "damaged" / "results.jsonl")
    assert f"results.jsonl is damaged: line {n + 1}: not UTF-8" in one_line(str(caught.value))


# -- model checkpoints -----------------------------------------------------------------------------


def test_model_checkpoints(dg_run, tmp_path, capsys):
    good = dg_run / "model.pt"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    np.save(folder / "array.npy", np.zeros(3))
    other = torch.nn.Linear(3, 2).state_dict()
    checkpoint = safe_torch_load(good)
    checkpoint["model"] = {k: v[..., :1] for k, v in checkpoint["model"].items()}
    cases = {
        "truncated.pt": (truncated(good, folder / "truncated.pt"), "is not a readable torch file, truncated"),
        "corrupt.pt": (corrupt(good, folder / "corrupt.pt"), "is not a readable torch file, truncated"),
        "numpy.pt": (folder / "array.npy", "is not a readable torch file: not written by torch.save"),
        "results.pt": (dg_run / "results.jsonl", "is not a readable torch file: not written by torch.save"),
        "state_dict.pt": (other, "lacks args, hparams, input_shape"),
        "wrong_types.pt": (
            {**checkpoint, "args": ["RotatedDigits"]},
            "checkpoint's args (list) are not what",
        ),
        "mis_shaped.pt": (checkpoint, "hparams describe) do not fit the Sequential (wrong shape: "),
    }
    for name, (source, _) in cases.items():
        if isinstance(source, dict):
            torch.save(source, folder / name)
        elif source != folder / name:
            shutil.copy(source, folder / name)
    before = snapshot(folder)
    for name, (_, message) in cases.items():
        assert main(["diagnose", str(folder / name), *FAST]) == 2, name
        out, err = capsys.readouterr()
        assert out == "" and message in one_line(err), (name, err)
    assert snapshot(folder) == before  # no diagnose.json, no figure, nothing changed


def test_multi_task_checkpoints(tmp_path):
    from torchsage.mtl.args import MTLArgs
    from torchsage.mtl.checkpoint import load_for_diagnostics
    from torchsage.mtl.train import train

    args = MTLArgs(benchmark="multidigits", solver="ls", output_dir=str(tmp_path / "run"), epochs=1,
                   n_train=16, n_test=16, batch_size=8, width=2, progress=False, save_model=True)  # fmt: skip
    run = train(args)
    good = Path(run) / "model.pt"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    payload = safe_torch_load(good)
    payload["model"] = {k: v.flatten()[:1] for k, v in payload["model"].items()}
    torch.save(payload, folder / "mis_shaped.pt")
    torch.save({"benchmark": "multidigits", "models": {}}, folder / "stl.pt")
    cases = {
        truncated(good, folder / "truncated.pt"): (
            UnreadableFileError,
            "is not a readable torch file, truncated",
        ),
        folder / "mis_shaped.pt": (
            ValueError,
            "(benchmark multidigits) do not fit the MultiLeNet (wrong shape: ",
        ),
        folder / "stl.pt": (ValueError, "holds single-task (stl) models"),
        folder / "missing.pt": (FileNotFoundError, "does not exist (train with --save-model)"),
    }
    before = snapshot(tmp_path)
    for path, (kind, message) in cases.items():
        with pytest.raises(kind) as caught:
            load_for_diagnostics(path)
        assert message in one_line(str(caught.value)), (path, caught.value)
    assert snapshot(tmp_path) == before


# -- optimizer state -------------------------------------------------------------------------------


def _sage(params, seed: int = 1) -> torchsage.SAGE:
    return torchsage.SAGE(params, torch.optim.SGD, rho=0.05, gamma=0.1, seed=seed, lr=0.1, momentum=0.9)


def _state(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_optimizer_state(tmp_path):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = _sage([w])
    for _ in range(2):
        opt.step(lambda: [(w**2).sum(), ((w - 1) ** 2).sum()])
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    loaded = safe_torch_load(tmp_path / "optimizer.pt", what="optimizer state")  # tensors and plain values
    assert _same(loaded, opt.state_dict())

    damaged_noise = copy.deepcopy(loaded)
    damaged_noise["torchsage"]["generators"]["cpu"] = torch.zeros(3, dtype=torch.uint8)
    wrong_groups = torchsage.SAGE([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))],
                                  torch.optim.SGD, seed=1, lr=0.1, momentum=0.9).state_dict()  # fmt: skip
    foreign = {
        "a model's state dict": (torch.nn.Linear(3, 1).state_dict(), "not an optimizer state_dict: it lacks"),
        "a whole checkpoint": ({"model": {}, "args": {}}, "not an optimizer state_dict: it lacks"),
        "SAM's state": (torchsage.SAM([w], torch.optim.SGD, lr=0.1).state_dict(), "saved by SAM, not SAGE"),
        "another model's": (wrong_groups, "doesn't match the size of optimizer's group"),
        "a damaged noise state": (damaged_noise, "noise generator state for cpu is damaged"),
        "not a dict": ([1, 2], "expected an optimizer state_dict (a dict), got a list"),
    }
    fresh = _sage([torch.nn.Parameter(w.detach().clone())], seed=2)
    fresh.step(lambda: [(fresh.param_groups[0]["params"][0] ** 2).sum()] * 2)
    before = _state(fresh)
    for name, (state, message) in foreign.items():
        with pytest.raises(ValueError) as caught:
            fresh.load_state_dict(state)
        assert message in one_line(str(caught.value)), name
        assert _same(_state(fresh), before), name  # nothing half-loaded
    with pytest.raises(
        UnreadableFileError, match=r"optimizer state .* is not a readable torch file, truncated"
    ):
        safe_torch_load(truncated(tmp_path / "optimizer.pt", tmp_path / "cut.pt"), what="optimizer state")
    fresh.load_state_dict(loaded)
    assert _same(fresh.state_dict(), opt.state_dict())


# -- pretrained weights ----------------------------------------------------------------------------


def test_pretrained_weights(tmp_path):
    from torchsage.dg.resnet import load_backbone_weights

    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    weights = [t.clone() for t in network.state_dict().values()]
    torch.save(network.state_dict(), tmp_path / "good.pth")
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "other.pth")
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")
    cases = {
        truncated(tmp_path / "good.pth", tmp_path / "cut.pth"): "is not a readable torch file, truncated",
        corrupt(tmp_path / "good.pth", tmp_path / "corrupt.pth"): "is not a readable torch file, truncated",
        tmp_path / "page.pth": "is not a readable torch file: not written by torch.save",
        tmp_path / "other.pth": "do not fit the Sequential (missing: 0.bias, 0.weight, 1.bias",
        tmp_path / "tensor.pth": "holds a Tensor, not a state_dict",
    }
    before = snapshot(tmp_path)
    for path, message in cases.items():
        with pytest.raises(ValueError) as caught:
            load_backbone_weights(network, path)
        assert message in one_line(str(caught.value)), (path, caught.value)
        assert all(torch.equal(a, b) for a, b in zip(weights, network.state_dict().values()))
    assert snapshot(tmp_path) == before


# -- data arrays, caches and images ----------------------------------------------------------------


def test_data_arrays_and_images(tmp_path):
    from torchsage.mtl.data import NYUv2, write_fake_nyuv2

    root = write_fake_nyuv2(tmp_path / "nyuv2", n=1, size=(8, 8))
    image = root / "train" / "image" / "0.npy"
    good = tmp_path / "good.npy"
    shutil.copy(image, good)
    cases = {
        "truncated": (truncated(good, tmp_path / "cut.npy"), "is not a readable NumPy file, truncated"),
        "foreign": (None, "is not a NumPy file (.npy or .npz)"),
        "pickled": (None, "holds pickled Python objects: refused"),
    }
    (tmp_path / "foreign.npy").write_text("P3 8 8 255")
    np.save(
        tmp_path / "pickled.npy",
        np.array([_CreatesFile(tmp_path / "marker")], dtype=object),
        allow_pickle=True,
    )
    for name, (source, message) in cases.items():
        shutil.copy(source or tmp_path / f"{name}.npy", image)
        before = snapshot(tmp_path)
        with pytest.raises(UnreadableFileError) as caught:
            NYUv2(root, "train")[0]
        text = one_line(str(caught.value))
        assert text.startswith(f"NYUv2 image array {image} ") and message in text, text
        assert snapshot(tmp_path) == before and not (tmp_path / "marker").exists()

    Image = pytest.importorskip("PIL.Image")
    from torchsage.dg.images import DatasetError, ImageFolderEnvironment

    domain = tmp_path / "photo"
    (domain / "dog").mkdir(parents=True)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8), "RGB").save(domain / "dog" / "a.png")
    png = (domain / "dog" / "a.png").read_bytes()
    (domain / "dog" / "b.png").write_bytes(png[: len(png) // 2])
    (domain / "dog" / "c.jpg").write_bytes(b"not an image at all")
    env = ImageFolderEnvironment(domain, image_size=4)
    before = snapshot(domain)
    for index, name in ((1, "b.png"), (2, "c.jpg")):
        with pytest.raises(DatasetError) as caught:
            env[index]
        assert re.match(rf"cannot decode image {domain / 'dog' / name}: ", one_line(str(caught.value)))
    assert snapshot(domain) == before


def test_data_caches(tmp_path):
    """A content-hashed cache as the data sets built from registry packages keep (.npz or .pt)."""
    from torchsage.files import safe_numpy_load

    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / "good.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
    torch.save({"images": torch.zeros(4, 3, 8, 8), "labels": torch.arange(4)}, cache / "good.pt")
    marker = tmp_path / "marker"
    np.savez(cache / "pickled.npz", images=np.array([_CreatesFile(marker)], dtype=object))
    torch.save({"images": _CreatesFile(marker)}, cache / "crafted.pt")
    (cache / "foreign.npz").write_bytes(b"\x89PNG\r\n\x1a\n")
    cases = {
        truncated(
            cache / "good.npz", cache / "cut.npz"
        ): "is not a readable NumPy file, truncated or corrupt",
        cache / "pickled.npz": "holds pickled Python objects: refused",
        cache / "foreign.npz": "is not a NumPy file (.npy or .npz)",
        truncated(cache / "good.pt", cache / "cut.pt"): "is not a readable torch file, truncated or corrupt",
        cache / "crafted.pt": "besides tensors and plain values: refused",
    }
    before = snapshot(tmp_path)
    for path, message in cases.items():
        load = safe_numpy_load if path.suffix == ".npz" else safe_torch_load
        with pytest.raises(UnreadableFileError) as caught:
            load(path, what="data cache")
        text = one_line(str(caught.value))
        assert text.startswith(f"data cache {path} ") and message in text, text
    assert snapshot(tmp_path) == before and not marker.exists()
    assert safe_numpy_load(cache / "good.npz", what="data cache")["labels"].tolist() == [0, 1, 2, 3]


# -- the study's files -----------------------------------------------------------------------------


def test_study_files(tmp_path):
    from torchsage.study import pilot, records
    from torchsage.study.theory import THEORY_FILE, load_theory

    run = tmp_path / "dg" / "run"
    run.mkdir(parents=True)
    (tmp_path / "pilot_times.jsonl").write_bytes(b'{"run": "a", "wall_s": 1.0}\n{"run": "b", "wal')
    (tmp_path / "study_records.jsonl").write_bytes(b'{"kind": "summary", "dg_missing": 0}\n\xff\xfe\n')
    cases = [
        (b'{"run": "run", "report": {"trace"', "is not valid JSON (Expecting"),
        ('{"run": "r\xe9"}'.encode("latin-1"), "is not UTF-8 text"),
    ]
    for content, message in cases:
        (run / THEORY_FILE).write_bytes(content)
        before = snapshot(tmp_path)
        with pytest.raises(UnreadableFileError) as caught:
            load_theory(tmp_path)
        assert one_line(str(caught.value)).startswith(f"theory terms {run / THEORY_FILE} {message}")
        assert snapshot(tmp_path) == before
    with pytest.raises(UnreadableFileError) as caught:
        pilot.summary(tmp_path)
    assert "pilot_times.jsonl is damaged: line 2: invalid JSON" in one_line(str(caught.value))
    with pytest.raises(ValueError) as caught:
        records.load(tmp_path / "study_records.jsonl")
    assert "study_records.jsonl: line 2: not UTF-8; export it again" in one_line(str(caught.value))
    assert snapshot(tmp_path) == before


# -- the table itself ------------------------------------------------------------------------------


def test_every_row_of_the_docs_table_names_a_test():
    table = (ROOT / "docs" / "files.md").read_text()
    named = {(path, name) for path, name in re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", table)}
    assert len(named) == len(table.split("\n| ")) - 2  # one a row (the header and its rule aside)
    for path, name in named:
        assert f"\ndef {name}(" in (ROOT / path).read_text(), (path, name)
    here = {
        n for n in globals() if n.startswith("test_") and n != "test_every_row_of_the_docs_table_names_a_test"
    }
    assert here <= {name for _, name in named}
