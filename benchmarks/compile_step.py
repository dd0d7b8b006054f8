"""SAGE's step with the user's model under ``torch.compile`` against the eager model.

The model (the DomainBed MNIST CNN, or a 784-512-512-10 MLP) is wrapped in ``torch.compile``
(default ``inductor`` backend); SAGE (rho 0.05, gamma 0.01, SGD lr 0.01) steps on K random batches
with the eager and the compiled model from identical weights. After a warm-up (which compiles:
its time is printed apart), every round runs one eager and one compiled step in alternating order;
the medians are printed with their ratio, and the graph breaks and graphs TorchDynamo counted.

    python benchmarks/compile_step.py --model cnn --k 3 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch._dynamo
import torch.nn.functional as F

import torchsage
from _models import make_batches, make_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = make_model(args.model)
    batches = make_batches(args.k, args.batch)
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    nets = {"eager": eager_model, "compiled": torch.compile(compiled_model)}
    models = {"eager": eager_model, "compiled": compiled_model}
    opts = {
        name: torchsage.SAGE(m.parameters(), torch.optim.SGD, rho=0.05, gamma=0.01, lr=0.01, seed=0)
        for name, m in models.items()
    }

    def step(name: str) -> float:
        net = nets[name]
        start = time.perf_counter()
        opts[name].step(lambda: [F.cross_entropy(net(x), y) for x, y in batches])
        return time.perf_counter() - start

    torch._dynamo.utils.counters.clear()
    warm = {name: step(name) for name in nets}  # the compiled model compiles here
    warm.update({f"{name}_2": step(name) for name in nets})
    times: dict[str, list[float]] = {name: [] for name in nets}
    for r in range(args.rounds):
        for name in ["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]:
            times[name].append(step(name))
    counters = torch._dynamo.utils.counters
    drift = max(
        float((p - q).detach().abs().max())
        for p, q in zip(eager_model.parameters(), compiled_model.parameters())
    )
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "k": args.k,
                "batch": args.batch,
                "rounds": args.rounds,
                "threads": args.threads,
                "first_step_s": {k: round(v, 3) for k, v in warm.items()},
                "median_step_ms": {k: round(1e3 * v, 2) for k, v in median.items()},
                "compiled_over_eager": round(median["compiled"] / median["eager"], 3),
                "graph_breaks": sum(counters["graph_break"].values()),
                "unique_graphs": counters["stats"]["unique_graphs"],
                "max_weight_difference": drift,
            }
        )
    )


if __name__ == "__main__":
    main()
