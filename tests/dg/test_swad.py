"""SWAD (torchsage.dg.swad): the LossValley rule against a brute-force re-implementation written
here, the segment mean against weights recorded by hand, BatchNorm recomputation, and training runs
whose swad.json equals evaluating a network loaded with the expected average, with results.jsonl
unchanged by the option."""

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsage.dg.algorithms import get_algorithm
from torchsage.dg.datasets import environment_splits, get_dataset
from torchsage.dg.swad import LossValley, Segment, SegmentMean, recompute_batchnorm
from torchsage.dg.train import TrainArgs, train


def reference(losses, n_converge, n_tolerance, ratio):
    """The authors' rule by index arithmetic over the whole loss sequence (no queues): the indices
    of the segments averaged (in order, repeats included), the converging index, the threshold and
    the evaluation index at which the valley died."""
    T = len(losses)
    added, conv, threshold, dead = [], None, None, None
    for t in range(T):
        if dead is not None:
            continue
        if conv is None:
            if t + 1 < n_converge:
                continue
            window = losses[t - n_converge + 1 : t + 1]
            if min(window) != window[0]:  # the first of equal minima must be the oldest
                continue
            conv = t - n_converge + 1
            threshold = sum(window) / len(window) * (1 + ratio)
            if n_tolerance < n_converge:
                added += [conv + 1 + i for i in range(n_converge - n_tolerance)]
            elif n_tolerance > n_converge:
                queue = list(range(max(0, t - n_tolerance + 1), t + 1))[: n_tolerance - n_converge + 1]
                above = [k for k, j in enumerate(queue) if losses[j] > threshold]
                start = above[-1] + 1 if above else 0
                added += queue[start + 1 :]
            continue
        oldest = max(0, t - n_tolerance + 1)  # the smoothing window: the last n_tolerance segments
        if oldest < conv:
            continue
        if min(losses[oldest : t + 1]) > threshold:
            dead = t
            continue
        added.append(oldest)
    if conv is None:
        return [T - 1], None, None, None
    if dead is None:
        for j in range(max(0, T - n_tolerance) + 1, T):  # the window T - n_tolerance.., less its oldest
            if min(losses[j:]) > threshold:
                break
            added.append(j)
    return added or [conv], conv, threshold, dead


def drive(losses, values, n_converge, n_tolerance, ratio):
    valley = LossValley(n_converge, n_tolerance, ratio)
    for j, (loss, value) in enumerate(zip(losses, values)):
        valley.update(Segment(10 * j + 1, 10 * j + 10, loss, [torch.tensor(value, dtype=torch.float64)]))
    return valley, valley.finish()


def check_against_reference(losses, n_converge, n_tolerance, ratio, rng):
    values = [rng.uniform(-5, 5) for _ in losses]
    valley, final = drive(losses, values, n_converge, n_tolerance, ratio)
    added, conv, threshold, dead = reference(losses, n_converge, n_tolerance, ratio)
    assert [(s.start_step - 1) // 10 for s in final.segments] == added
    assert float(final.weights[0]) == pytest.approx(sum(values[j] for j in added) / len(added), abs=1e-12)
    assert valley.converged == (conv is not None)
    assert valley.converge_step == (None if conv is None else 10 * conv + 10)
    assert valley.dead_valley_step == (None if dead is None else 10 * dead + 10)
    if threshold is not None:
        assert valley.threshold == pytest.approx(threshold, rel=1e-12)
    return added, conv, dead


def test_loss_valley_follows_the_brute_force_rule_on_scripted_losses():
    rng = random.Random(0)
    seen = {"never converged": 0, "dead": 0, "alive": 0, "repeats": 0, "placeholder only": 0}
    for _ in range(3000):
        n_converge, n_tolerance = rng.randint(1, 7), rng.randint(1, 7)
        ratio = rng.choice([0.0, 0.05, 0.3, 1.0])
        T = rng.randint(1, 25)
        # a valley: falling, flat with noise, rising again, at random depths and widths
        bottom, rise = rng.randint(0, T), rng.uniform(0.0, 0.4)
        losses = [2.0 - 0.1 * min(t, bottom) + rise * max(0, t - bottom) ** 1.5 for t in range(T)]
        losses = [loss + rng.uniform(0, 0.3) for loss in losses]
        added, conv, dead = check_against_reference(losses, n_converge, n_tolerance, ratio, rng)
        if conv is None:
            seen["never converged"] += 1
        else:
            seen["dead" if dead is not None else "alive"] += 1
            seen["repeats"] += len(set(added)) < len(added)
            seen["placeholder only"] += added == [conv]
    assert all(n >= 20 for n in seen.values()), seen


def test_loss_valley_scripted_cases():
    # defaults (3, 6, 0.3): converges on segment 2 at evaluation 4 (threshold 1.3 x 1.1); the smoothing
    # queue, not yet full, holds segments 0..4, and its first 6 - 3 + 1 = 4 (0..3) are scanned: the
    # youngest above the threshold is segment 1 (position 1), so positions 3.. (segment 3) are added
    losses = [9.0, 2.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    valley, final = drive(losses, [float(j) for j in range(len(losses))], 3, 6, 0.3)
    assert valley.converge_step == 30 and valley.threshold == pytest.approx(1.1 * 1.3)
    # evaluations 5, 6: the queue's oldest (0, 1) precedes segment 2, nothing happens; from 7 on the
    # oldest of the full window (2, 3, ...) is added while the window's minimum stays <= 1.43, until the
    # window 7..12 (minimum 1.5) kills the valley at evaluation 12: segment 3 is counted twice
    assert [(s.start_step - 1) // 10 for s in final.segments] == [3, 2, 3, 4, 5, 6]
    assert float(final.weights[0]) == pytest.approx(23 / 6)
    assert valley.dead_valley_step == 10 * 12 + 10
    # never converged (falling losses): the last segment alone
    valley, final = drive([3.0, 2.0, 1.0], [0.0, 1.0, 2.0], 3, 6, 0.3)
    assert not valley.converged and [s.end_step for s in final.segments] == [30]
    assert float(final.weights[0]) == 2.0


def test_segment_mean_is_the_mean_of_the_weights_after_each_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.1)
    mean = SegmentMean(trainable)
    recorded, segments = [], []
    for step in range(11):
        x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        recorded.append([p.detach().double().clone() for p in trainable])
        mean.add(step)
        if step in (0, 5, 10):  # checkpoints
            segments.append(mean.close(step, loss=float(step)))
    assert [(s.start_step, s.end_step) for s in segments] == [(0, 0), (1, 5), (6, 10)]
    for segment in segments:
        steps = recorded[segment.start_step : segment.end_step + 1]
        assert len(segment.weights) == 3 and all(w.device.type == "cpu" for w in segment.weights)
        for k, weight in enumerate(segment.weights):
            expected = sum(s[k] for s in steps) / len(steps)
            torch.testing.assert_close(weight.double(), expected, rtol=0, atol=1e-6)


class FrozenFirstNorm(nn.Sequential):
    """The first BatchNorm stays in evaluation mode under train() (as with frozen blocks)."""

    def train(self, mode=True):
        super().train(mode)
        self[1].eval()
        return self


def test_batchnorm_statistics_are_recomputed_as_cumulative_averages():
    torch.manual_seed(0)
    net = FrozenFirstNorm(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5), nn.BatchNorm1d(5))
    net[1].running_mean.fill_(0.5)
    net[3].running_mean.fill_(7.0)
    batches = [torch.randn(6, 3) * 2 + 1 for _ in range(4)]
    frozen_mean = net[1].running_mean.clone()
    net.eval()
    assert recompute_batchnorm(net, iter(batches), 4) == 1
    assert not net.training and net[3].momentum == 0.1
    with torch.no_grad():
        h = [net[2](net[1](net[0](x))) for x in batches]  # the first norm with its (kept) statistics
    torch.testing.assert_close(net[3].running_mean, torch.stack([z.mean(0) for z in h]).mean(0))
    torch.testing.assert_close(net[3].running_var, torch.stack([z.var(0) for z in h]).mean(0))
    assert torch.equal(net[1].running_mean, frozen_mean)


TINY = {"cnn_width": 8}
STEPS, FREQ = 30, 5


def run(tmp_path, name, algorithm, hparams, monkeypatch=None):
    recorded, holder = [], {}
    if monkeypatch is not None:  # the trainable weights of the network after every training step
        cls = get_algorithm(algorithm)
        update = cls.update

        def recording(self, minibatches, step):
            out = update(self, minibatches, step)
            holder["network"] = self.network
            trainable = [p for p in self.network.parameters() if p.requires_grad]
            recorded.append([p.detach().double().clone() for p in trainable])
            return out

        monkeypatch.setattr(cls, "update", recording)
    out = train(
        TrainArgs(
            "RotatedDigits",
            algorithm,
            [0],
            str(tmp_path / name),
            steps=STEPS,
            checkpoint_freq=FREQ,
            hparams=json.dumps(hparams),
            progress=False,
            num_workers=0,
        )
    )
    if monkeypatch is not None:
        monkeypatch.undo()
    return out, recorded, holder.get("network")


def loaded(network, weights):
    net = copy.deepcopy(network)
    with torch.no_grad():
        for p, w in zip([p for p in net.parameters() if p.requires_grad], weights):
            p.copy_(w)
    return net.eval()


@torch.no_grad()
def predictions(net, part):
    x = torch.stack([part.dataset[i][0] for i in part.indices])
    y = torch.tensor([int(part.dataset[i][1]) for i in part.indices])
    return net(x), y


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("ERM", {"swad_n_converge": 1}),  # converged at once: the early-queue repeats of segment 0
        ("SAGE", {"lr": 0.3, "swad_n_tolerance": 2}),  # plateau; n_tolerance < n_converge
        ("ERM", {}),  # the defaults: still falling after 30 steps, never converged
    ],
)
def test_train_writes_the_averaged_models_accuracies_and_leaves_the_records_alone(
    algorithm, extra, tmp_path, monkeypatch
):
    hparams = {**TINY, **{k: v for k, v in extra.items() if not k.startswith("swad")}}
    out, recorded, network = run(tmp_path, "swad", algorithm, {**hparams, **extra, "swad": True}, monkeypatch)
    plain, _, _ = run(tmp_path, "plain", algorithm, hparams)
    swad = json.loads((out / "swad.json").read_text())
    assert len(recorded) == STEPS

    # the records and hence model selection: equal but for the timing and the hparam itself
    def strip(line):
        record = json.loads(line)
        record.pop("step_time")
        record["hparams"] = {k: v for k, v in record["hparams"].items() if not k.startswith("swad")}
        record["args"].pop("output_dir")
        record["args"].pop("hparams")  # the --hparams text, which names swad
        return record

    with_swad = [strip(line) for line in (out / "results.jsonl").read_text().splitlines()]
    without = [strip(line) for line in (plain / "results.jsonl").read_text().splitlines()]
    assert with_swad == without and not (plain / "swad.json").exists()

    # segments between checkpoints, their validation losses computed here from the recorded weights
    checkpoints = [s for s in range(STEPS) if s % FREQ == 0 or s == STEPS - 1]
    bounds = list(zip([0] + [c + 1 for c in checkpoints[:-1]], checkpoints))
    splits = environment_splits(get_dataset("RotatedDigits"), 0.2, 0)
    losses = []
    for _, end in bounds:
        net = loaded(network, recorded[end])
        per_env = [F.cross_entropy(*predictions(net, splits[i][1])).item() for i in range(1, 6)]
        losses.append(sum(per_env) / len(per_env))
    assert [s for s, _ in swad["validation_losses"]] == checkpoints
    assert [v for _, v in swad["validation_losses"]] == pytest.approx(losses, rel=1e-5)

    h = {"swad_n_converge": 3, "swad_n_tolerance": 6, "swad_tolerance_ratio": 0.3, **extra}
    added, conv, threshold, dead = reference(
        losses, h["swad_n_converge"], h["swad_n_tolerance"], h["swad_tolerance_ratio"]
    )
    assert swad["segments"] == [list(bounds[j]) for j in added]
    assert swad["n_segments"] == len(added) and swad["converged"] == (conv is not None)
    assert swad["start_step"] == min(bounds[j][0] for j in added)
    assert swad["end_step"] == max(bounds[j][1] for j in added)
    assert swad["dead_valley_step"] == (None if dead is None else checkpoints[dead])
    assert swad["converged"] == (extra != {})  # the two runs set up to converge did
    if threshold is not None:
        assert swad["threshold"] == pytest.approx(threshold, rel=1e-6)

    # the expected average: the mean over the added segments of each segment's mean over its steps
    means = [
        [sum(recorded[s][k] for s in range(a, b + 1)) / (b - a + 1) for k in range(len(recorded[0]))]
        for a, b in bounds
    ]
    average = [sum(means[j][k] for j in added) / len(added) for k in range(len(recorded[0]))]
    net = loaded(network, average)
    for env, (part_in, part_out) in enumerate(splits):
        for name, part in (("in", part_in), ("out", part_out)):
            logits, y = predictions(net, part)
            assert swad[f"env{env}_{name}_acc"] == (logits.argmax(1) == y).sum().item() / len(y)


@pytest.mark.parametrize(
    "override, name",
    [
        ({"swad_n_converge": -1}, "swad_n_converge"),
        ({"swad_n_converge": 2.5}, "swad_n_converge"),
        ({"swad_n_tolerance": 0}, "swad_n_tolerance"),
        ({"swad_tolerance_ratio": -0.1}, "swad_tolerance_ratio"),
        ({"swad_tolerance_ratio": "0.3"}, "swad_tolerance_ratio"),
        ({"swad": "yes"}, "swad"),
    ],
)
def test_bad_swad_hparams_are_one_value_error_naming_them(override, name, tmp_path):
    args = TrainArgs(
        "RotatedDigits",
        "ERM",
        [0],
        str(tmp_path / "run"),
        steps=2,
        hparams=json.dumps({**TINY, "swad": True, **override}),
        progress=False,
    )
    with pytest.raises(ValueError, match=f"hparam {name} "):
        train(args)
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_swad_under_torchrun_matches_one_process(tmp_path):
    """Two gloo processes: the losses and counts summed over them give the one-process swad.json
    (SGD keeps the two runs within float32 rounding, see tests/distributed/test_dg_train.py)."""
    hparams = {"cnn_width": 8, "batch_size": 8, "optimizer": "sgd", "lr": 0.05, "swad": True}
    hparams["swad_n_converge"] = 1
    argv = ["-m", "torchsage", "dg", "train", "--dataset", "RotatedDigits", "--algorithm", "ERM"]
    argv += ["--test-envs", "0", "--steps", "12", "--checkpoint-freq", "2", "--no-progress"]
    argv += ["--hparams", json.dumps(hparams)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for cmd, name in ((launch[1:], "two"), ([], "one")):
        proc = subprocess.run(
            [sys.executable, *cmd, *argv, "--output-dir", str(tmp_path / name)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = (json.loads((tmp_path / name / "swad.json").read_text()) for name in ("two", "one"))
    assert two["segments"] == one["segments"] and two["converged"]
    assert [s for s, _ in two["validation_losses"]] == [s for s, _ in one["validation_losses"]]
    # means of ~60 cross-entropies at weights equal to ~1e-6 (measured: 8e-8 relative)
    assert [v for _, v in two["validation_losses"]] == pytest.approx(
        [v for _, v in one["validation_losses"]], rel=1e-5
    )
    accuracies = [k for k in one if k.endswith("_acc")]
    assert len(accuracies) == 12 and all(abs(two[k] - one[k]) <= 1 / 60 + 1e-12 for k in accuracies)
