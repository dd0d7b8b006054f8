"""Registry names without regard to case and punctuation, as the docs spell them."""

import pytest

from torchsage.dg.algorithms import canonical_algorithm
from torchsage.dg.datasets import canonical_dataset
from torchsage.mtl.benchmarks import canonical_benchmark
from torchsage.mtl.solvers import canonical_solver
from torchsage.registry import normalize, resolve


@pytest.mark.parametrize(
    "function, spelling, registered",
    [
        (canonical_dataset, "rotateddigits", "RotatedDigits"),
        (canonical_dataset, "Colored-Digits", "ColoredDigits"),
        (canonical_algorithm, "sage", "SAGE"),
        (canonical_algorithm, "SAGECurvatureOnly", "SAGE_CurvatureOnly"),
        (canonical_algorithm, "fishr", "Fishr"),
        (canonical_benchmark, "MultiDigits", "multidigits"),
        (canonical_solver, "IMTL-G", "imtlg"),
        (canonical_solver, "Nash-MTL", "nashmtl"),
        (canonical_solver, "UPGrad", "upgrad"),
    ],
)
def test_spellings_of_the_docs_resolve(function, spelling, registered):
    assert function(spelling) == registered


def test_unknown_and_ambiguous_names_list_the_known_ones():
    assert normalize("Nash-MTL_v2") == "nashmtlv2"
    with pytest.raises(ValueError, match=r"unknown solver 'magic': use one of upgrad, "):
        canonical_solver("magic")
    with pytest.raises(ValueError, match="unknown thing 'ab': use one of a-b, A_B"):
        resolve("ab", ["a-b", "A_B"], "thing")  # two registered names match: refused, not guessed
