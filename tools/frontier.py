"""The quality-speed frontier: each KV setting's quality on the demo beside its speed and memory on GPT-XL.

Joins `adsa-fidelity` reports (fidelity.json: recognition, KL, FID per policy and budget, one file per K/V
storage) with `adsa-bench` reports (bench.json: images/s and memory per policy, budget and K/V storage) on
(policy, budget fraction, K/V storage), and writes frontier.md (the table, and for each quality bar the fastest
setting that meets it) and frontier.png (recognition lost against images/s, one marker per setting).

    python tools/frontier.py --fidelity auto=fid/fidelity.json --fidelity fp8=fid8/fidelity.json \
        --bench bench/bench.json --bench bench8/bench.json --out docs/fidelity

Quality comes from the demo model (128 px, 256 tokens), speed from GPT-XL 384 (577 tokens) at the same budget
fractions: budgets are matched as fractions of each model's sequence (within 0.01).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

BARS = (0.01, 0.02, 0.05)  # recognition points lost against dense that an operator may accept
# speeds this close (relative) are one speed: in one call, adsa and line (kernels within 2.5 % of each other) differ
# by up to 4.5 % either way at batch 256, one wave (docs/PERFORMANCE.md, run 15)
SPEED_TIE = 0.05


@dataclass(frozen=True)
class Setting:
    policy: str
    fraction: float  # of the sequence; 1.0 for dense
    kv: str  # "auto" (the model's dtype, bf16) or "fp8"
    recognition_delta: float  # against dense with the model's K/V storage (demo; see join)
    delta_se: float
    kl: float
    fid: float | None
    img_per_s: float  # of the bench's model
    bench_model: str  # the bench's model and image size, e.g. "GPT-XL 384"
    peak_gib: float
    kv_gib: float
    batch: int


def _fraction(budget: float | None) -> float:
    return 1.0 if budget is None else float(budget)


def join(fidelity: dict[str, dict], benches: list[dict]) -> list[Setting]:
    """Settings present in both: fidelity[kv] rows x bench rows with that kv storage. Recognition is compared with
    dense in the model's K/V storage (the quality the model has): the auto report's own paired difference, and for
    another storage the difference to that dense row with the two standard errors combined (other draws: unpaired)."""
    ref = next((r for r in fidelity.get("auto", {"rows": []})["rows"] if r["policy"] == "dense"), None)
    speed = {}
    for b in benches:
        for r in b["rows"]:
            if r["policy"] != "reference" and r.get("img_per_s"):
                speed[(r["policy"], round(_fraction(r["budget"]), 2), r["kv_cache_dtype"])] = r
    out = []
    for kv, report in fidelity.items():
        for r in report["rows"]:
            frac = 1.0 if r["policy"] == "dense" else r["budget_fraction"]
            b = next((v for (p, f, k), v in speed.items() if p == r["policy"] and k == kv and abs(f - frac) <= 0.01),
                     None)
            if b is None:
                continue
            delta, se = r.get("recognition_delta") or 0.0, r.get("recognition_delta_se") or 0.0
            if kv != "auto" and ref is not None:
                delta = r["recognition_acc"] - ref["recognition_acc"]
                se = (r["recognition_se"] ** 2 + ref["recognition_se"] ** 2) ** 0.5
            out.append(Setting(r["policy"], frac, kv, delta, se, r["kl"], r.get("fid"), b["img_per_s"],
                               f"{b['model']} {b['size']}", b["peak_memory_bytes"] / 2**30, b["kv_bytes"] / 2**30,
                               b["batch"]))
    return sorted(out, key=lambda s: (s.kv, s.policy, -s.fraction))


def fastest_within(settings: list[Setting], bar: float) -> Setting | None:
    """The fastest setting that loses at most `bar` of dense's recognition; among those within SPEED_TIE of the
    fastest, the one with the lowest KL (the speed difference is noise, the quality one is not)."""
    ok = [s for s in settings if s.recognition_delta >= -bar]
    if not ok:
        return None
    top = max(s.img_per_s for s in ok)
    return min((s for s in ok if s.img_per_s >= (1 - SPEED_TIE) * top), key=lambda s: s.kl)


def markdown(settings: list[Setting]) -> str:
    fmt = lambda x, p: "–" if x is None else format(x, p)  # noqa: E731
    models = ", ".join(sorted({s.bench_model for s in settings}))
    lines = ["| policy | budget | K/V | recognition vs dense bf16, points (demo) | KL / token (vs its own dense) | "
             f"FID | img/s ({models}) | "
             "peak GiB | KV GiB | batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in settings:
        budget = "all" if s.policy == "dense" else f"{s.fraction:.3g}"
        lines.append(f"| {s.policy} | {budget} | {s.kv} | {s.recognition_delta * 100:+.1f} ± {s.delta_se * 100:.1f} "
                     f"| {s.kl:.3f} | {fmt(s.fid, '.2f')} | {s.img_per_s:.1f} | {s.peak_gib:.1f} | "
                     f"{s.kv_gib:.1f} | {s.batch} |")
    lines.append("")
    for bar in BARS:
        best = fastest_within(settings, bar)
        if best is not None:
            lines.append(f"- fastest within {bar * 100:g} point(s) of dense recognition (speeds within "
                         f"{SPEED_TIE:.0%} tie, then the lower KL): **{best.policy} "
                         f"{'' if best.policy == 'dense' else f'{best.fraction:.3g} '}({best.kv} K/V)**, "
                         f"{best.img_per_s:.1f} img/s, {best.peak_gib:.1f} GiB peak")
    return "\n".join(lines) + "\n"


def plot(settings: list[Setting], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = {"dense": "black", "adsa": "tab:blue", "window": "tab:gray", "line": "tab:red"}
    for (policy, kv) in sorted({(s.policy, s.kv) for s in settings}):
        pts = sorted((s for s in settings if s.policy == policy and s.kv == kv), key=lambda s: s.img_per_s)
        ax.errorbar([s.img_per_s for s in pts], [s.recognition_delta * 100 for s in pts],
                    yerr=[s.delta_se * 100 for s in pts], marker="o" if kv == "auto" else "s",
                    linestyle="-" if kv == "auto" else "--", color=colors.get(policy, "tab:green"), capsize=2,
                    label=f"{policy}, {'bf16' if kv == 'auto' else kv} K/V")
        for s in pts:
            if s.policy != "dense":
                ax.annotate(f"{s.fraction:.2g}", (s.img_per_s, s.recognition_delta * 100), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
    for bar in BARS[:2]:
        ax.axhline(-bar * 100, color="tab:gray", linewidth=0.6, linestyle=":")
    models = ", ".join(sorted({s.bench_model for s in settings}))
    ax.set_xlabel(f"images/s, {models} (adsa-bench)")
    ax.set_ylabel("recognition vs dense bf16, points (demo, ± SE)")
    ax.set_title("KV settings: quality lost against speed (labels: budget fraction)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fidelity", action="append", required=True, metavar="KV=PATH",
                    help="K/V storage (auto or fp8) = an adsa-fidelity fidelity.json; repeat per storage")
    ap.add_argument("--bench", action="append", required=True, metavar="PATH",
                    help="an adsa-bench bench.json; repeat to join several (e.g. one per K/V storage)")
    ap.add_argument("--out", type=Path, required=True, help="folder for frontier.md and frontier.png")
    args = ap.parse_args()
    fidelity = {}
    for item in args.fidelity:
        kv, sep, path = item.partition("=")
        if not sep or kv not in ("auto", "fp8"):
            ap.error(f"--fidelity takes auto=PATH or fp8=PATH, not {item!r}")
        fidelity[kv] = json.loads(Path(path).read_text())
    settings = join(fidelity, [json.loads(Path(p).read_text()) for p in args.bench])
    if not settings:
        ap.error("no setting is in both the fidelity and the bench reports")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.md").write_text(markdown(settings))
    plot(settings, args.out / "frontier.png")
    print(markdown(settings))


if __name__ == "__main__":
    main()
