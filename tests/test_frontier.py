"""tools/frontier.py: the join of fidelity and bench reports, and the rule that picks a setting per quality bar."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tools_frontier", REPO / "tools" / "frontier.py")
frontier = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = frontier  # its dataclass resolves annotations through the module
spec.loader.exec_module(frontier)


def fid_row(policy, fraction, acc, se=0.01, delta=None, delta_se=0.008, kl=0.1):
    return dict(policy=policy, budget_fraction=fraction, recognition_acc=acc, recognition_se=se,
                recognition_delta=delta, recognition_delta_se=delta_se, kl=kl, fid=7.0)


def bench_row(policy, budget, kv, img_per_s):
    return dict(policy=policy, budget=budget, kv_cache_dtype=kv, img_per_s=img_per_s, batch=256, model="GPT-XL",
                size=384, peak_memory_bytes=10 * 2**30, kv_bytes=5 * 2**30)


FIDELITY = {
    "auto": {"rows": [fid_row("dense", 1.0, 0.957, delta=0.0, kl=0.0), fid_row("adsa", 0.5, 0.947, delta=-0.010),
                      fid_row("line", 0.5, 0.961, delta=0.004, kl=0.056), fid_row("line", 0.25, 0.914, delta=-0.043),
                      fid_row("line", 0.168, 0.836, delta=-0.121)]},
    "fp8": {"rows": [fid_row("dense", 1.0, 0.938, se=0.011, delta=0.0, kl=0.0),
                     fid_row("line", 0.5, 0.943, delta=0.006, kl=0.066)]},
}
BENCH = {"rows": [bench_row("reference", None, "auto", 15.0), bench_row("dense", None, "auto", 25.3),
                  bench_row("adsa", 0.5, "auto", 30.5), bench_row("line", 0.5, "auto", 30.1),
                  bench_row("line", 0.25, "auto", 41.8), bench_row("line", 0.1667, "auto", 49.5),
                  bench_row("dense", None, "fp8", 46.9), bench_row("line", 0.5, "fp8", 51.9),
                  bench_row("adsa", 0.25, "auto", 42.0)]}  # no fidelity row: left out


def test_join_matches_budgets_as_fractions_and_compares_fp8_with_bf16_dense():
    settings = frontier.join(FIDELITY, [BENCH])
    keys = {(s.policy, round(s.fraction, 3), s.kv) for s in settings}
    assert keys == {("dense", 1.0, "auto"), ("adsa", 0.5, "auto"), ("line", 0.5, "auto"), ("line", 0.25, "auto"),
                    ("line", 0.168, "auto"), ("dense", 1.0, "fp8"), ("line", 0.5, "fp8")}
    fp8_line = next(s for s in settings if s.kv == "fp8" and s.policy == "line")
    assert fp8_line.img_per_s == 51.9
    assert fp8_line.recognition_delta == pytest.approx(0.943 - 0.957)  # against bf16 dense, not its own
    assert fp8_line.delta_se == pytest.approx((0.01**2 + 0.01**2) ** 0.5)
    bf16_line = next(s for s in settings if s.kv == "auto" and s.policy == "line" and s.fraction == 0.5)
    assert bf16_line.recognition_delta == 0.004 and bf16_line.delta_se == 0.008  # the paired difference as measured


def test_fastest_within_a_bar_breaks_speed_ties_by_kl():
    settings = frontier.join(FIDELITY, [BENCH])
    # within 1 point: adsa 1/2 (30.5) and line 1/2 (30.1) are one speed; line has half the KL
    assert (frontier.fastest_within(settings, 0.01).policy, frontier.fastest_within(settings, 0.01).kv) == (
        "line", "auto")
    assert frontier.fastest_within(settings, 0.02).kv == "fp8"  # -1.4 points, 51.9 img/s
    five = frontier.fastest_within(settings, 0.05)
    assert (five.policy, five.kv, five.img_per_s) == ("line", "fp8", 51.9)  # line 1/4 bf16 is slower
    bf16 = [s for s in settings if s.kv == "auto"]
    assert frontier.fastest_within(bf16, 0.13).fraction == pytest.approx(0.168)  # -12.1 points, 49.5 img/s
    assert frontier.fastest_within([s for s in settings if s.recognition_delta < -0.5], 0.01) is None


def test_cli_writes_the_table_and_the_plot(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps(FIDELITY["auto"]))
    (tmp_path / "b.json").write_text(json.dumps(BENCH))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "frontier.py"), "--fidelity", f"auto={tmp_path}/f.json",
                        "--bench", str(tmp_path / "b.json"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = (out / "frontier.md").read_text()
    assert "| line | 0.5 | auto | +0.4 ± 0.8 |" in table and "**line 0.5 (auto K/V)**" in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "frontier.py"), "--fidelity", "bf16=x.json",
                          "--bench", "b.json", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "auto=PATH or fp8=PATH" in bad.stderr
