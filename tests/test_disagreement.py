"""``disagreement`` and ``GradientStatistics`` against brute-force float64 formulas.

With K gradients ``g_k`` (every parameter flattened and concatenated) and their mean ``g_bar``:
``raw_var = (1/K) sum_k ||g_k - g_bar||^2``, ``raw_std = sqrt(raw_var)``,
``normalized_var = raw_var / ||g_bar||^2``, ``normalized_std = sqrt(raw_var) / ||g_bar||`` and
``cosine = 1 - mean_{i<j} cos(g_i, g_j)``, where a cosine with a zero vector counts as 0.
"""

import gc
import itertools
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchsage import GradientStatistics, disagreement
from torchsage.disagreement import MEASURES

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (7, 1)]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(entry) -> torch.Tensor:
    tensors = [entry] if isinstance(entry, torch.Tensor) else list(entry)
    return torch.cat([t.detach().to(F64).reshape(-1) for t in tensors])


def brute_force(grads) -> dict[str, float]:
    """Every measure (and the mean pairwise cosine) straight from the definitions, in float64."""
    vectors = [flat(g) for g in grads]
    K = len(vectors)
    mean = sum(vectors) / K
    raw_var = sum(float(((v - mean) ** 2).sum()) for v in vectors) / K
    mean_norm = float(mean.norm())
    cosines = []
    for u, v in itertools.combinations(vectors, 2):
        nu, nv = float(u.norm()), float(v.norm())
        cosines.append(float(u @ v) / (nu * nv) if nu > 0 and nv > 0 else 0.0)
    mean_cosine = sum(cosines) / len(cosines) if cosines else 1.0
    return {
        "raw_var": raw_var,
        "raw_std": math.sqrt(raw_var),
        "normalized_var": raw_var / mean_norm**2 if raw_var > 0 else 0.0,
        "normalized_std": math.sqrt(raw_var) / mean_norm if raw_var > 0 else 0.0,
        "cosine": 1.0 - mean_cosine,
        "mean_cosine": mean_cosine,
    }


def make_grads(K, shapes, seed, dtype=F64, spread=0.5):
    """K per-parameter gradient lists: a shared direction plus independent noise of size ``spread``."""
    gen = generator(seed)
    base = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    return [
        [(b + spread * torch.randn(b.shape, generator=gen, dtype=F64)).to(dtype) for b in base]
        for _ in range(K)
    ]


def assert_measures(value_of, expected: dict[str, float], rtol: float, atol: float = 0.0) -> None:
    for measure in MEASURES:
        value = value_of(measure)
        assert value.dtype == F64 and value.shape == ()
        # the cosine measure lies in [0, 2]: an absolute tolerance suits it at any gradient scale
        tolerance = max(atol, 1e-12) if measure == "cosine" else atol
        assert float(value) == pytest.approx(expected[measure], rel=rtol, abs=tolerance), measure


def test_measures_are_the_documented_five():
    assert set(MEASURES) == {"raw_var", "raw_std", "normalized_var", "normalized_std", "cosine"}


@pytest.mark.parametrize("K", [2, 3, 5, 8])
@pytest.mark.parametrize("layout", ["flat", "lists"])
@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_every_measure_matches_brute_force(K, layout, dtype, rtol):
    grads = make_grads(K, SHAPES, seed=K, dtype=dtype)
    if layout == "flat":
        grads = [torch.cat([t.reshape(-1) for t in g]) for g in grads]
    expected = brute_force(grads)
    assert_measures(lambda m: disagreement(grads, m), expected, rtol)


@PROPERTY
@given(
    K=st.integers(1, 8),
    n=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
    log_spread=st.floats(-3.0, 3.0),
    log_scale=st.floats(-6.0, 6.0),
)
def test_every_measure_matches_brute_force_property(K, n, seed, log_spread, log_scale):
    scale = 10.0**log_scale
    grads = [g[0] * scale for g in make_grads(K, [(n,)], seed, spread=10.0**log_spread)]
    # eps=0: the exact normalised measures, whatever the scale of the mean
    assert_measures(lambda m: disagreement(grads, m, eps=0.0), brute_force(grads), rtol=1e-9)


@pytest.mark.parametrize("g", [torch.randn(6), torch.zeros(6), torch.randn(2, 3)])
def test_one_distribution_gives_zero(g):
    for measure in MEASURES:
        assert disagreement([g], measure).item() == 0.0
        assert disagreement([[g, g]], measure).item() == 0.0


@pytest.mark.parametrize("K", [2, 5, 8])
def test_identical_gradients_give_zero(K):
    g = [t.float() for t in make_grads(1, SHAPES, seed=K)[0]]
    for measure in MEASURES:
        value = disagreement([[t.clone() for t in g] for _ in range(K)], measure).item()
        assert 0.0 <= value <= 1e-6, measure


def test_opposite_gradients():
    g = torch.randn(10, dtype=F64, generator=generator(1))
    assert disagreement([g, -g], "cosine").item() == pytest.approx(2.0, abs=1e-12)
    assert disagreement([g, -g], "raw_var").item() == pytest.approx(float(g @ g), rel=1e-12)
    grads = [g, -g, 2 * g, -3 * g]  # cosines: four pairs at -1, two at +1
    assert disagreement(grads, "cosine").item() == pytest.approx(1 - (-4 + 2) / 6, abs=1e-12)
    assert_measures(lambda m: disagreement(grads, m), brute_force(grads), rtol=1e-10)


@pytest.mark.parametrize("zeros, K", [(1, 2), (1, 3), (2, 5), (3, 4)])
def test_zero_gradient_has_cosine_zero_with_the_others(zeros, K):
    grads = make_grads(K, SHAPES, seed=10 * zeros + K)
    for k in [0, K - 1, 1][:zeros]:
        grads[k] = [torch.zeros_like(t) for t in grads[k]]
    expected = brute_force(grads)
    assert_measures(lambda m: disagreement(grads, m), expected, rtol=1e-10)
    stats = GradientStatistics(grads[0], cosine=True)
    for g in grads:
        stats.update(g)
    assert stats.mean_cosine().item() == pytest.approx(expected["mean_cosine"], rel=1e-10, abs=1e-14)


def test_all_zero_gradients_follow_the_zero_cosine_convention():
    # Every pairwise cosine involves a zero vector and so counts as 0: the cosine measure is 1, while
    # the variance-based measures are 0.
    grads = [torch.zeros(4) for _ in range(3)]
    assert disagreement(grads, "cosine").item() == pytest.approx(1.0, abs=1e-12)
    assert brute_force(grads)["cosine"] == 1.0
    for measure in ("raw_var", "raw_std", "normalized_var", "normalized_std"):
        assert disagreement(grads, measure).item() == 0.0


# -- numerical care -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_nearly_identical_float32_gradients_keep_their_variance(seed):
    gen = generator(seed)
    n, K = 4096, 8
    g = torch.randn(n, generator=gen, dtype=F64)
    noise = torch.randn(K, n, generator=gen, dtype=F64)
    G32 = (g / g.norm() + 1e-4 * noise / noise.norm(dim=1, keepdim=True)).float()  # ||g|| = 1
    grads = list(G32)
    expected = brute_force(grads)  # exact for the float32 values the library is given
    assert expected["raw_var"] == pytest.approx(1e-8 * (K - 1) / K, rel=0.1)

    assert disagreement(grads, "raw_var").item() == pytest.approx(expected["raw_var"], rel=1e-3)
    for measure in ("raw_std", "normalized_var", "normalized_std", "cosine"):
        assert disagreement(grads, measure).item() == pytest.approx(expected[measure], rel=1e-3), measure

    # The textbook formula in the gradients' own precision cancels catastrophically here, which is
    # what makes the checks above meaningful.
    naive = (G32 * G32).sum(dim=1).mean() - G32.mean(dim=0).square().sum()
    assert abs(naive.item() - expected["raw_var"]) > 0.5 * expected["raw_var"]
    U32 = G32 / G32.norm(dim=1, keepdim=True)
    naive_cosine = 1 - ((U32 @ U32.T).sum() - K) / (K * (K - 1))
    assert abs(naive_cosine.item() - expected["cosine"]) > 0.5 * expected["cosine"]


@pytest.mark.parametrize("noise", [0.0, 1e-9, 1e-7, 1e-5])
def test_variance_is_never_negative(noise):
    for seed in range(5):
        gen = generator(seed)
        g = torch.randn(1000, generator=gen)
        grads = [g + noise * torch.randn(1000, generator=gen) for _ in range(6)]
        for measure in MEASURES:
            value = disagreement(grads, measure).item()
            assert value >= 0.0 and math.isfinite(value), (measure, value)
        # accurate up to the float32 resolution of the running mean
        resolution = g.numel() * (torch.finfo(torch.float32).eps * g.abs().max().item()) ** 2
        assert disagreement(grads, "raw_var").item() == pytest.approx(
            brute_force(grads)["raw_var"], rel=1e-3, abs=resolution
        )


# -- GradientStatistics ---------------------------------------------------------------------------


# streamed (Welford, in the gradients' dtype) against a float64 batch formula: a running mean of 7
# rounds by ~7 unit roundoffs (float32 8e-7, float64 1.6e-15), times the measures' condition
# number (a few at this spread): float32 1e-5, float64 1e-10
@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_streaming_matches_brute_force_after_every_update(dtype, rtol):
    grads = make_grads(7, SHAPES, seed=3, dtype=dtype)
    stats = GradientStatistics(grads[0], cosine=True, elementwise=True)
    for k, g in enumerate(grads, start=1):
        norm = stats.update(g)
        assert norm.dtype == F64
        assert norm.item() == pytest.approx(float(flat(g).norm()), rel=rtol)
        assert stats.count == k
        assert_measures(stats.disagreement, brute_force(grads[:k]), rtol)
    # the streamed statistics are the batch ones
    assert_measures(lambda m: disagreement(grads, m), brute_force(grads), rtol)


# the same operations on a copy or in place: equal up to the order of a subtraction, a few unit
# roundoffs of values of size ~1 (float32 1e-6, float64 1e-12)
@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_inplace_update_gives_the_same_statistics(dtype, atol):
    grads = make_grads(5, SHAPES, seed=4, dtype=dtype)
    originals = [[t.clone() for t in g] for g in grads]
    copying = GradientStatistics(grads[0], cosine=True, elementwise=True)
    inplace = GradientStatistics(grads[0], cosine=True, elementwise=True)
    for k, g in enumerate(grads):
        previous_mean = [
            sum(o[i] for o in originals[:k]) / k if k else torch.zeros_like(t) for i, t in enumerate(g)
        ]
        scratch = [t.clone() for t in g]
        n1 = copying.update(g)
        n2 = inplace.update(scratch, inplace=True)
        assert n1.item() == pytest.approx(n2.item(), rel=1e-12)
        for t, o in zip(g, originals[k]):
            assert torch.equal(t, o)  # inplace=False leaves the gradient alone
        for t, o, m in zip(scratch, originals[k], previous_mean):
            # inplace=True leaves g_k minus the mean of the gradients before it
            torch.testing.assert_close(t, o - m, rtol=0.0, atol=atol)
    expected = brute_force(originals)
    for stats in (copying, inplace):
        assert_measures(stats.disagreement, expected, rtol=1e-10 if dtype == F64 else 1e-5)
    for a, b in zip(copying.mean, inplace.mean):
        torch.testing.assert_close(a, b, rtol=0.0, atol=atol)
    for a, b in zip(copying.elementwise_variance(), inplace.elementwise_variance()):
        torch.testing.assert_close(a, b, rtol=0.0, atol=atol)


# a running mean of 6 values of size ~2 against a float64 mean: ~6 unit roundoffs times 2
# (float32 2e-6, float64 1e-12); the variance, a difference of such values, 1e-5 relative
@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 2e-6)])
def test_mean_and_elementwise_variance(dtype, atol):
    grads = make_grads(6, SHAPES, seed=5, dtype=dtype, spread=2.0)
    stats = GradientStatistics(grads[0], elementwise=True)
    for g in grads:
        stats.update(g)
    variances = stats.elementwise_variance()
    assert len(stats.mean) == len(variances) == len(SHAPES)
    for i, shape in enumerate(SHAPES):
        stacked = torch.stack([g[i].to(F64) for g in grads])
        assert stats.mean[i].shape == shape and stats.mean[i].dtype == dtype
        assert variances[i].shape == shape
        torch.testing.assert_close(stats.mean[i].to(F64), stacked.mean(dim=0), rtol=0.0, atol=atol)
        reference = torch.var(stacked, dim=0, unbiased=False)
        torch.testing.assert_close(variances[i].to(F64), reference, rtol=1e-5, atol=atol)
    # the coordinates' variances add up to the trace of the covariance
    total = sum(float(v.to(F64).sum()) for v in variances)
    assert total == pytest.approx(brute_force(grads)["raw_var"], rel=1e-5)


class _Workers:
    """Threads standing in for processes: ``sum`` adds every worker's tensors (in worker order, so
    all get the same sums), as an all-reduce does."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=60)  # a failing worker breaks it: no hang
        self.slots: list = [None] * n

    def sum(self, rank: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.slots[rank] = [t.clone() for t in tensors]
        self.barrier.wait()
        out = [sum(parts[1:], parts[0].clone()) for parts in zip(*self.slots)]
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


@pytest.mark.parametrize("split", [(2, 3), (1, 1, 3), (4, 1)])
def test_merged_statistics_of_disjoint_workers_match_brute_force(split):
    # the domains layout of data-parallel training: each worker streams its own distributions,
    # then merge() combines them into the statistics of all of them
    grads = make_grads(sum(split), SHAPES, seed=11, spread=1.5)
    grads[1] = [torch.zeros_like(t) for t in grads[1]]  # a zero gradient: cosine 0 with the others
    starts = list(itertools.accumulate(split, initial=0))
    workers = _Workers(len(split))
    stats = [GradientStatistics(grads[0], cosine=True, elementwise=True) for _ in split]
    for s, a, b in zip(stats, starts, starts[1:]):
        for g in grads[a:b]:
            s.update(g)
    with ThreadPoolExecutor(len(split)) as pool:
        runs = [
            pool.submit(s.merge, lambda ts, r=r: workers.sum(r, ts), len(grads)) for r, s in enumerate(stats)
        ]
        for run in runs:
            run.result()  # a worker's exception is raised here
    expected = brute_force(grads)
    for s in stats:
        assert s.count == len(grads) and s.total == float(len(grads))
        # float64 sums regrouped by worker: differences of a few ulps, far below 1e-10
        assert_measures(s.disagreement, expected, rtol=1e-10)
        for i in range(len(SHAPES)):
            stacked = torch.stack([g[i] for g in grads])
            torch.testing.assert_close(s.mean[i], stacked.mean(0), rtol=1e-12, atol=1e-12)
            reference = torch.var(stacked, dim=0, unbiased=False)
            torch.testing.assert_close(s.elementwise_variance()[i], reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_mean_cosine(K):
    grads = make_grads(K, SHAPES, seed=K, spread=1.5)
    stats = GradientStatistics(grads[0], cosine=True)
    for g in grads:
        stats.update(g)
    expected = brute_force(grads)["mean_cosine"]
    assert stats.mean_cosine().item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    if K == 1:
        assert stats.mean_cosine().item() == 1.0


def test_none_gradient_counts_as_zero():
    grads = make_grads(4, SHAPES, seed=8)
    grads[1][0] = None  # one parameter the loss did not reach
    grads[2] = [None] * len(SHAPES)  # a distribution that reached no parameter
    stats = GradientStatistics(grads[0], cosine=True, elementwise=True)
    norms = [stats.update(g).item() for g in grads]
    dense = [[torch.zeros(s, dtype=F64) if t is None else t for t, s in zip(g, SHAPES)] for g in grads]
    expected = brute_force(dense)
    assert norms == pytest.approx([float(flat(g).norm()) for g in dense], rel=1e-12)
    assert norms[2] == 0.0
    assert_measures(stats.disagreement, expected, rtol=1e-10)
    assert stats.mean_cosine().item() == pytest.approx(expected["mean_cosine"], rel=1e-10)
    for i in range(len(SHAPES)):
        stacked = torch.stack([g[i] for g in dense])
        torch.testing.assert_close(stats.mean[i], stacked.mean(dim=0), rtol=0.0, atol=1e-12)
        torch.testing.assert_close(
            stats.elementwise_variance()[i], torch.var(stacked, dim=0, unbiased=False), rtol=0.0, atol=1e-12
        )


def _tensors_held(obj) -> list[torch.Tensor]:
    found = []

    def visit(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(vars(obj))
    return found


@pytest.mark.parametrize("cosine, elementwise", [(False, False), (True, False), (True, True)])
def test_memory_does_not_grow_with_the_number_of_distributions(cosine, elementwise):
    like = [torch.zeros(s) for s in SHAPES]
    footprints = []
    for K in (2, 20):
        stats = GradientStatistics(like, cosine=cosine, elementwise=elementwise)
        fed = []
        for k in range(K):
            g = [torch.randn(s, generator=generator(k)) for s in SHAPES]
            fed.extend(weakref.ref(t) for t in g)
            stats.update(g)
            del g
        gc.collect()
        assert all(ref() is None for ref in fed), "a fed gradient is still referenced"
        held = _tensors_held(stats)
        footprints.append((len(held), sum(t.numel() for t in held)))
    assert footprints[0] == footprints[1]
    numel = sum(math.prod(s) for s in SHAPES)
    buffers = 1 + cosine + elementwise  # mean, unit mean, per-coordinate M2 (+ `like` and scalars)
    assert footprints[1][1] <= (buffers + 1) * numel + 8


# -- argument checking ----------------------------------------------------------------------------


def test_bad_arguments_raise_value_error():
    g = [torch.randn(3), torch.randn(2, 2)]
    with pytest.raises(ValueError, match="measure"):
        disagreement([g, g], "variance")
    with pytest.raises(ValueError):
        disagreement([], "raw_var")
    with pytest.raises(ValueError):
        disagreement([g, [torch.randn(3), torch.randn(4)]], "raw_var")  # a shape differs
    with pytest.raises(ValueError):
        disagreement([g, g[:1]], "raw_var")  # a tensor is missing
    with pytest.raises(ValueError):
        disagreement([torch.randn(3), torch.randn(4)], "cosine")

    stats = GradientStatistics(g)
    stats.update(g)
    with pytest.raises(ValueError, match="measure"):
        stats.disagreement("variance")
    with pytest.raises(ValueError):
        stats.update(g[:1])
    with pytest.raises(ValueError, match="cosine"):
        stats.disagreement("cosine")
    with pytest.raises(ValueError, match="cosine"):
        stats.mean_cosine()
    with pytest.raises(ValueError, match="cosine"):
        stats.cosine_disagreement()
    with pytest.raises(ValueError, match="elementwise"):
        stats.elementwise_variance()
