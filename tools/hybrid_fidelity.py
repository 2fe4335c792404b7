"""adsa-fidelity with experimental hybrid policies registered: ADSA's redundancy and line's attention score in one
victim key (issue #20's "hybrid worth testing"), key = redundancy - weight * attention in kv.policy.VictimKey's
units (mean cosine similarity; attention share, 1 = uniform). The hybrids have no Triton kernel rule, so every row
runs on the torch path (fine on a CPU, slower on a GPU); results: docs/FIDELITY.md, "A hybrid of adsa and line".

    python tools/hybrid_fidelity.py --weights 0.25,1 --policies line,hybrid0.25,hybrid1 --budgets 1/2,1/4 ...

Every flag but --weights is adsa-fidelity's.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from adsa_core.eval.fidelity import main as fidelity_main
from adsa_core.kv.policy import KVPolicy, register


def register_hybrids(weights: list[float]) -> None:
    for i, w in enumerate(weights):
        key = lambda redundancy, position, attention, w=w: redundancy - w * attention  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no Triton kernel rule": known, the torch path is the point
            register(KVPolicy(f"hybrid{w:g}", 100 + i, key, scores_attention=True))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)  # --help goes on to adsa-fidelity
    ap.add_argument("--weights", type=lambda t: [float(x) for x in t.split(",")], default=[0.25, 1.0])
    args, rest = ap.parse_known_args()
    register_hybrids(args.weights)
    sys.exit(fidelity_main(rest))
