"""Multi-node scaling: trials/hour of one search on one node versus two nodes of the same size.

    python -m benchmarks.scaling [--node-cpus 1] [--num-samples 8] [--epochs 2] [--repeats 1]

Both clusters are real multi-raylet Ray clusters on this machine (ray.cluster_utils.Cluster), run
one after the other in this process; the search is the same (digits, fixed epochs, no early
stopping, random initial state, no warm start and no refit, so both do identical trial work).
Throughput is measured over the search loop (first trial start to last trial end, from
results.csv) and also end to end (the whole command).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import REPO, header, mean_std


def one_search(nodes: int, node_cpus: int, args: argparse.Namespace, work: Path) -> dict:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": node_cpus})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=node_cpus)
        cluster.wait_for_nodes()
        name = f"n{nodes}-{int(time.time() * 1000)}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "search.run", "--num-samples",
                        str(args.num_samples), "--max-epochs", str(args.epochs), "--space",
                        f"epochs={args.epochs}", "--grace-period", str(args.epochs),
                        "--init", "random", "--no-refit",  # trial throughput only
                        "--experiment", name, "--storage", str(work / "runs"),
                        "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"], cwd=work,
                       env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
    finally:
        cluster.shutdown()
    table = pd.read_csv(work / "runs" / name / "results.csv")
    span = table["ended_at"].max() - table["started_at"].min()
    return {"loop": len(table) / span * 3600, "e2e": len(table) / wall * 3600,
            "nodes_used": table["node_id"].nunique()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node-cpus", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    print(header("multi-node scaling (digits, resnet10t 32 px)", args.repeats,
                 f"{args.num_samples} trials x {args.epochs} epochs, nodes of "
                 f"{args.node_cpus} CPU"), flush=True)
    got: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for nodes in (1, 2):
                r = one_search(nodes, args.node_cpus, args, Path(tmp))
                got[nodes].append(r)
                print(f"{nodes} node(s): {r['loop']:.0f} trials/h in the search loop, "
                      f"{r['e2e']:.0f} trials/h end to end, trials ran on {r['nodes_used']} "
                      "node(s)", flush=True)
    for kind in ("loop", "e2e"):
        one = [r[kind] for r in got[1]]
        two = [r[kind] for r in got[2]]
        ratios = [b / a for a, b in zip(one, two)]
        print(f"{kind:>4}: 1 node {mean_std(one)} trials/h, 2 nodes {mean_std(two)} trials/h, "
              f"ratio {mean_std(ratios)} (goal >= 1.8)")


if __name__ == "__main__":
    main()
