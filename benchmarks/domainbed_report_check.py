"""``torchsage dg report`` against DomainBed's own ``collect_results.py`` on the same records.

Usage::

    python benchmarks/domainbed_report_check.py DOMAINBED_CHECKOUT SWEEP_DIR

``DOMAINBED_CHECKOUT`` is a clone of facebookresearch/DomainBed; its ``domainbed`` package is
imported as it is, except its data-set and algorithm registries, which import torchvision and know
only DomainBed's names: they are replaced by torchsage's names and environments (DomainBed drops
records of data sets outside its registry). Both sides read the same records: those torchsage's
``load_records`` keeps (finished runs; DomainBed's loader would also read unfinished ones). For
every selection method it prints DomainBed's tables, then compares every cell DomainBed prints
with torchsage's: the per-data-set cells ("mean +/- SE"), the per-data-set "Avg" (DomainBed prints
the mean only, so only the mean is compared), and every cell of the "Averages" table. It ends with
the count of identical and different cells, and exits 1 if any differ. DomainBed prints a row for
every algorithm in every table, all "X" on a data set the algorithm never ran on; torchsage leaves
such rows out, and they are counted apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import types
from pathlib import Path

METHODS = {  # DomainBed's name -> torchsage's
    "IIDAccuracySelectionMethod": "training-domain validation",
    "LeaveOneOutSelectionMethod": "leave-one-domain-out cross-validation",
    "OracleSelectionMethod": "test-domain validation (oracle)",
}


def domainbed_module(checkout: Path):
    """DomainBed's collect_results module with torchsage's registries in place of its own."""
    from torchsage.dg.algorithms import ALGORITHMS
    from torchsage.dg.datasets import DATASETS, environment_names

    sys.path.insert(0, str(checkout))
    import domainbed

    datasets = types.ModuleType("domainbed.datasets")
    datasets.DATASETS = sorted(DATASETS)
    datasets.num_environments = lambda name: len(environment_names(name))
    datasets.get_dataset_class = lambda name: types.SimpleNamespace(ENVIRONMENTS=environment_names(name))
    algorithms = types.ModuleType("domainbed.algorithms")
    algorithms.ALGORITHMS = sorted(ALGORITHMS)
    for name, module in (("datasets", datasets), ("algorithms", algorithms)):
        sys.modules[f"domainbed.{name}"] = module
        setattr(domainbed, name, module)
    from domainbed.scripts import collect_results

    return collect_results


def domainbed_tables(text: str) -> dict[tuple[str, str], dict[str, list[str]]]:
    """{(title, method): {algorithm: cells}} from DomainBed's plain-text tables (fixed-width
    columns: 20 characters per data-set table, 25 for the averages, two spaces apart)."""
    tables: dict[tuple[str, str], dict[str, list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"-------- (?:Dataset: (\S+)|(Averages)), model selection method: (.+)$", line)
        if not match:
            continue
        title = match[1] or "Averages"
        width = 25 if match[2] else 20
        rows = {}
        for row in lines[i + 2 :]:
            if not row.strip() or row.startswith("--------"):
                break
            cells = [row[j : j + width].strip() for j in range(0, len(row), width + 2)]
            rows[cells[0]] = cells[1:]
        tables[(title, match[3].strip())] = rows
    return tables


def torchsage_tables(text: str) -> dict[tuple[str, str], dict[str, list[str]]]:
    """The same layout from torchsage's markdown report, in DomainBed's spelling."""
    tables = {}
    captions = re.finditer(
        r"^\*\*(?:Averages over data sets under (?P<avg>[^:]+)|(?P<dataset>[^,*]+), (?P<method>[^:*]+)):",
        text,
        re.M,
    )
    for caption in captions:
        title = "Averages" if caption["avg"] else caption["dataset"]
        method = caption["avg"] or caption["method"]
        rows = {}
        for line in text[caption.end() :].splitlines()[4:]:
            if not line.startswith("|"):
                break
            cells = [c.strip().replace(" ± ", " +/- ").replace("—", "X") for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        tables[(title, method.strip())] = rows
    return tables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("domainbed", type=Path, help="a clone of facebookresearch/DomainBed")
    parser.add_argument("sweep", type=Path, help="a torchsage sweep folder")
    args = parser.parse_args()

    from torchsage.dg.report import report
    from torchsage.dg.selection import load_records

    collect_results = domainbed_module(args.domainbed.resolve())
    from domainbed import model_selection
    from domainbed.lib.query import Q

    records = Q(load_records(args.sweep).records)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for name in METHODS:
            collect_results.print_results_tables(records, getattr(model_selection, name), latex=False)
    print(out.getvalue())
    names = {getattr(model_selection, k).name: v for k, v in METHODS.items()}
    theirs = {(t, names[m]): rows for (t, m), rows in domainbed_tables(out.getvalue()).items()}
    ours = torchsage_tables(report(args.sweep, make_plot=False))

    same, empty, differ = 0, 0, []
    for (title, method), rows in sorted(theirs.items()):
        mine = ours.get((title, method), {})
        for algorithm, cells in rows.items():
            if algorithm not in mine and set(cells) == {"X"}:
                empty += 1  # DomainBed lists every algorithm in every table; torchsage those run there
                continue
            for j, cell in enumerate(cells):
                other = (mine.get(algorithm) or ["<none>"] * len(cells))[j]
                if title != "Averages" and j == len(cells) - 1:
                    other = other.split(" +/- ")[0]  # DomainBed's per-data-set Avg has no error bar
                if cell == other or (cell == "X" and not mine):  # a table torchsage replaces by a note
                    same += 1
                else:
                    where = f"{method} / {title} / {algorithm} / column {j}"
                    differ.append(f"{where}: DomainBed {cell!r}, torchsage {other!r}")
    print(
        f"cells identical: {same}, different: {len(differ)}; "
        f"rows without any result that only DomainBed prints: {empty}"
    )
    for line in differ:
        print("  " + line)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
