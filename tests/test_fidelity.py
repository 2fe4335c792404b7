"""adsa-fidelity: the Fréchet distance, the per-token metrics, and the harness end to end on a tiny random
model (GPT dim 64, 2 layers, vocab 64, 16 tokens; the shared small VQ) with a tiny random classifier.

CPU, well under a minute. The demo test runs only when the demo assets are in the tree.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adsa_core.cli_common import model_spec_from_args
from adsa_core.config import CacheConfig, ConfigError, GPTConfig
from adsa_core.engine.offline import run_offline
from adsa_core.eval import features, fidelity, harness, metrics
from adsa_core.eval.classifier import ClassifierConfig, EmojiClassifier, save_classifier
from adsa_core.loading import DEMO_DIR, load_models
from adsa_core.sampling import SamplingParams

TESTDATA = Path(__file__).resolve().parent / "data" / "llamagen"
TINY_GPT = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10)


# ---------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def test_frechet_distance_diagonal_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    d = 12
    f64 = dict(generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, **f64), torch.randn(d, **f64)
    s1, s2 = torch.rand(d, **f64) + 0.1, torch.rand(d, **f64) * 3
    expected = (mu1 - mu2).pow(2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    got = metrics.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9)
    # A common rotation of both Gaussians changes nothing: exercises the full (non-diagonal) path.
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    rot = lambda s: q @ torch.diag(s) @ q.T
    got_rot = metrics.frechet_distance(q @ mu1, rot(s1), q @ mu2, rot(s2))
    assert got_rot == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_identity_and_rank_deficient() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g)  # 5 samples in 16-d: a rank-4 covariance
    mu, sigma = metrics.feature_stats(x)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    y = x + torch.tensor([1.0] + [0.0] * 15)  # shifted by a unit vector: FID = 1
    assert metrics.frechet_distance(*metrics.feature_stats(y), mu, sigma) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        metrics.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(60, 8, generator=g, dtype=torch.float64)
    (mu1, s1), (mu2, s2) = metrics.feature_stats(a * 2 + 1), metrics.feature_stats(b)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((mu1 - mu2).pow(2).sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * covmean))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_stats_match_numpy_and_class_balance() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    mu, sigma = metrics.feature_stats(x)
    assert torch.allclose(mu, x.mean(0)) and np.allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False))
    # Class-balanced: a class with 3 copies of one row weighs the same as a class with that row once.
    labels = torch.tensor([0, 0, 0, 1])
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mu_b, _ = metrics.feature_stats(rows, metrics.class_balance_weights(labels))
    assert torch.allclose(mu_b, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_token_metrics() -> None:
    lp = torch.log_softmax(torch.randn(7, 11, generator=torch.Generator().manual_seed(3)), -1)
    tokens = torch.randint(0, 11, (7,))
    same = metrics.token_metrics(lp, lp.clone(), tokens)
    assert same["kl"].abs().max() == 0 and same["agree"].min() == 1
    assert torch.allclose(same["nll"], -lp.gather(1, tokens[:, None]).view(-1))
    other = metrics.token_metrics(lp, torch.log_softmax(lp.flip(-1), -1), tokens)
    assert other["kl"].min() > 0


def test_plan_settings_dedupes_and_checks() -> None:
    gpt = GPTConfig(**TINY_GPT)  # seq_len 16, grid 4: at budget 8 the default regions shrink to n = 2, m = 5
    plan = harness.plan_settings(
        ["dense", "adsa", "window"], [8, 0.5], gpt, sweep_budget=10, sweep_prefix=[1, 2], sweep_local=[5, 6]
    )
    keys = [(r.policy, r.budget, r.prefix, r.local) for _, r in plan]
    assert keys[0][0] == "dense" and keys.count(keys[1]) == 1
    assert ("adsa", 8, 2, 5) in keys and len([k for k in keys if k[:2] == ("adsa", 8)]) == 1  # 8 == 0.5 * 16
    assert len([k for k in keys if k[:2] == ("adsa", 10)]) == 4
    assert len([k for k in keys if k[:2] == ("window", 10)]) == 2  # window does not depend on m
    with pytest.raises(ConfigError):
        harness.plan_settings(["adsa"], [4], gpt)  # 4 <= prefix 1 + local 5 (the floors)
    # several sweep budgets; pairs that do not fit one of them are skipped there, not an error
    plan = harness.plan_settings(["adsa"], [8], gpt, sweep_budget=[10, 8], sweep_prefix=[1, 3], sweep_local=[5])
    keys = [(r.policy, r.budget, r.prefix, r.local) for _, r in plan]
    assert ("adsa", 10, 3, 5) in keys and ("adsa", 10, 1, 5) in keys and ("adsa", 8, 1, 5) in keys
    assert ("adsa", 8, 3, 5) not in keys  # 8 <= 3 + 5
    with pytest.raises(ConfigError):  # a single impossible sweep point is still refused
        harness.plan_settings(["adsa"], [8], gpt, sweep_budget=8, sweep_prefix=[3], sweep_local=[5])


def test_default_regions_follow_cache_config() -> None:
    """Rows without --kv-prefix/--kv-local use CacheConfig's budget-dependent defaults (config.default_regions)."""
    gpt = GPTConfig(**{**TINY_GPT, "block_size": 256})  # the demo's geometry: grid 16, 256 KV tokens
    plan = harness.plan_settings(["adsa", "window"], [0.5, 0.25, 1 / 6], gpt)
    got = {(r.policy, r.budget): (r.prefix, r.local) for _, r in plan}
    assert got[("adsa", 128)] == (17, 33) and got[("adsa", 64)] == (17, 33) and got[("adsa", 43)] == (4, 33)
    assert got[("window", 43)] == (4, 33)
    for (_, budget), (n, m) in got.items():
        assert n + m <= budget - budget / 8
    explicit = harness.plan_settings(["adsa"], [1 / 6], gpt, prefix=1, local=32)
    assert (explicit[1][1].prefix, explicit[1][1].local) == (1, 32)  # as given


def test_seed_diversity() -> None:
    px = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
    px[1] = 255  # class 0: black vs white; class 1: two identical black images
    codes = torch.tensor([[1, 2], [1, 3], [5, 5], [5, 5]])
    d = metrics.seed_diversity(px, codes, torch.tensor([0, 0, 1, 1]))
    assert d["seed_diversity"] == pytest.approx(0.5) and d["seed_token_overlap"] == pytest.approx(0.75)
    assert metrics.seed_diversity(px, codes, torch.tensor([0, 1, 2, 3])) == {}


# ---------------------------------------------------------------------------------------------
# End to end on a tiny random model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    manifest = TESTDATA / "MANIFEST.json"
    assert manifest.is_file(), f"test vectors not found at {TESTDATA}"
    d = tmp_path_factory.mktemp("fidelity_tiny")
    vq_cfg = json.loads(manifest.read_text())["vq.pt"]["config"]
    torch.manual_seed(0)
    save_classifier(
        EmojiClassifier(ClassifierConfig(num_classes=10, width=8, image_size=16)).eval(), d / "clf.pt", torch.float32
    )
    rng = np.random.default_rng(0)
    np.savez(d / "ref.npz", images=rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8), labels=np.arange(30) % 10)
    model = [
        "--gpt-config",
        json.dumps(TINY_GPT),
        "--vq-ckpt",
        str(TESTDATA / "vq.pt"),
        "--vq-config",
        json.dumps(vq_cfg),
        "--device",
        "cpu",
    ]
    return {"dir": d, "model": model}


def _rows(out: Path) -> dict:
    report = json.loads((out / "fidelity.json").read_text())
    return report, {(r["policy"], r["budget_tokens"], r["prefix"], r["local"]): r for r in report["rows"]}


def test_end_to_end_tiny(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = fidelity.main(
        [
            *tiny["model"],
            "--policies",
            "dense,adsa,window",
            "--budgets",
            "1.0,8",
            "--classes",
            "0-2",
            "--seeds",
            "2",
            "--batch-size",
            "4",
            "--classifier",
            str(tiny["dir"] / "clf.pt"),
            "--reference-images",
            str(tiny["dir"] / "ref.npz"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "images in " in err and f"-> {out}" in err  # a successful run says where its report went
    for name in ("fidelity.json", "fidelity.md", "grid.png"):
        assert (out / name).is_file(), name
    report, rows = _rows(out)
    assert report["n_images"] == 6 and report["classes"] == [0, 1, 2]
    dense = rows[("dense", 16, 5, 9)]  # default regions at the full budget (16 slots): n = 1 + 4, m = 2 x 4 + 1
    assert dense["kl"] == 0 and dense["top1_agree"] == 1 and dense["token_agree"] == 1
    assert dense["pixel_mse"] == 0 and dense["fid_to_dense"] == 0 and dense["nll"] == dense["nll_dense"]
    full = rows[("adsa", 16, 5, 9)]  # a budget of the whole sequence never evicts
    assert full["kl"] < 1e-6 and full["top1_agree"] == 1 and full["token_agree"] == 1
    assert full["evictions_per_image"] == 0
    for policy in ("adsa", "window"):
        small = rows[(policy, 8, 2, 5)]
        assert small["kl"] > 1e-5 and small["kl_evicting_steps"] > small["kl"]
        assert small["peak_kv_tokens"] == 8 and small["evictions_per_image"] > 0
        assert small["token_agree"] < 1 and small["psnr_db"] is not None
    for r in rows.values():
        assert 0 <= r["recognition_acc"] <= 1 and r["fid"] >= 0
        assert r["recognition_se"] == pytest.approx((r["recognition_acc"] * (1 - r["recognition_acc"]) / 6) ** 0.5)
        assert 0 <= r["seed_diversity"] <= 1 and 0 <= r["seed_token_overlap"] <= 1  # 2 seeds per class
    assert dense["recognition_delta"] == 0 and dense["recognition_delta_se"] == 0
    small = rows[("adsa", 8, 2, 5)]
    assert small["recognition_delta"] == pytest.approx(small["recognition_acc"] - dense["recognition_acc"])
    assert "class-balanced" in report["reference"]
    md = (out / "fidelity.md").read_text()
    assert md.startswith("| policy | budget") and md.count("\n| adsa") == 2 and "∞" in md
    grid = Image.open(out / "grid.png")
    assert grid.width > 6 * 16 and grid.height > 5 * 16  # 5 rows (dense, adsa x2, window x2), 6 columns

    # The harness runs all settings in two mixed engine passes: the same numbers as one setting alone.
    models = load_models(model_spec_from_args(fidelity.build_parser().parse_args([*tiny["model"], "--out", "x"])))
    labels, seeds = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])
    sampling = SamplingParams()
    dense_run = run_offline(models, labels, sampling, seeds, CacheConfig("dense", None), 6, want_logits=True)
    alone = run_offline(
        models, labels, sampling, seeds, CacheConfig("adsa", 8), 6, forced=dense_run.codes, want_logits=True
    )
    kl = [metrics.token_metrics(d, q, c)["kl"] for d, q, c in zip(dense_run.logprobs, alone.logprobs, dense_run.codes)]
    assert torch.cat(kl).mean().item() == pytest.approx(rows[("adsa", 8, 2, 5)]["kl"], rel=1e-4, abs=1e-7)
    free = run_offline(models, labels, sampling, seeds, CacheConfig("adsa", 8), 6)
    token_agree = (free.codes == dense_run.codes).double().mean().item()
    assert token_agree == pytest.approx(rows[("adsa", 8, 2, 5)]["token_agree"])


def test_no_dense_check_gives_the_same_rows(tiny, tmp_path) -> None:
    args = [*tiny["model"], "--policies", "adsa", "--budgets", "8", "--classes", "4", "--seeds", "2"]
    assert fidelity.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert fidelity.main([*args, "--no-dense-check", "--out", str(tmp_path / "b")]) == 0
    rows_a, rows_b = _rows(tmp_path / "a")[0]["rows"], _rows(tmp_path / "b")[0]["rows"]
    assert rows_a == rows_b


def test_sampling_sweep(tiny, tmp_path, capsys) -> None:
    """Dense images under several sampling candidates in one engine pass; each equals its own run."""
    out = tmp_path / "s"
    rc = fidelity.main(
        [
            *tiny["model"],
            "--sampling-sweep",
            "cfg=4;cfg=1.5,t=0.7,top_k=20",
            "--classes",
            "0-2",
            "--seeds",
            "2",
            "--classifier",
            str(tiny["dir"] / "clf.pt"),
            "--reference-images",
            str(tiny["dir"] / "ref.npz"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "sampling.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["cfg 4, T 1", "cfg 1.5, T 0.7, top-k 20"]
    assert [r["is_default"] for r in report["rows"]] == [True, False]  # LlamaGen's defaults: cfg 4, T 1
    for r in report["rows"]:
        assert 0 <= r["recognition_acc"] <= 1 and r["fid"] >= 0 and "seed_diversity" in r
    md = (out / "sampling.md").read_text()
    assert md.startswith("| sampling | recognition acc") and "(default)" in md and (out / "grid.png").is_file()
    assert not (out / "fidelity.json").exists()
    # the candidate's images are those of a plain dense run with that sampling
    models = load_models(model_spec_from_args(fidelity.build_parser().parse_args([*tiny["model"], "--out", "x"])))
    labels, seeds = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])
    sp = SamplingParams(cfg_scale=1.5, temperature=0.7, top_k=20)
    codes = run_offline(models, labels, sp, seeds, CacheConfig("dense", None), 6).codes
    px = harness.pixels(models, codes, 6)
    expected = metrics.seed_diversity(px, codes, labels)
    assert report["rows"][1]["seed_diversity"] == pytest.approx(expected["seed_diversity"], rel=1e-5)
    assert report["rows"][1]["seed_token_overlap"] == pytest.approx(expected["seed_token_overlap"])
    # the default sampling is always measured, first, when the candidates do not list it
    rc = fidelity.main(
        [
            *tiny["model"],
            "--sampling-sweep",
            "cfg=1.5",
            "--classes",
            "0",
            "--seeds",
            "1",
            "--no-fid",
            "--out",
            str(tmp_path / "s2"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "s2" / "sampling.json").read_text())["rows"]
    assert [(r["label"], r["is_default"]) for r in rows] == [("cfg 4, T 1", True), ("cfg 1.5, T 1", False)]


def test_torchscript_features_and_image_folder(tiny, tmp_path, capsys) -> None:
    class Feat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)[:, :, None, None]  # (B, 6, 1, 1)

    ts = tmp_path / "feat.pt"
    with warnings.catch_warnings():  # the format real FID detectors ship in, deprecated by torch for writing
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", DeprecationWarning)
        torch.jit.script(Feat()).save(str(ts))
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = tmp_path / "out"
    rc = fidelity.main(
        [
            *tiny["model"],
            "--policies",
            "adsa",
            "--budgets",
            "8",
            "--classes",
            "3",
            "--seeds",
            "3",
            "--inception",
            str(ts),
            "--reference-images",
            str(ref),
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report, rows = _rows(out)
    assert report["features"] == "torchscript:feat.pt" and "8 images" in report["reference"]
    assert all(r["fid"] > 0 for r in rows.values())  # random pixels vs decoded images
    assert "recognition_acc" not in rows[("adsa", 8, 2, 5)]  # no classifier given
    assert any("recognition accuracy skipped" in n for n in report["notes"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policies", "dense,lru"], "unknown policy lru"),
        (["--budgets", "4"], "must be larger than prefix"),
        (["--budgets", "8", "--classes", "12"], "class 12 is outside"),
        (["--seeds", "0"], "positive integer"),
        (["--sampling-sweep", "cfg=2,top_p=0"], "top_p must be in"),
        (["--reference-images", "/nonexistent.npz"], "--reference-images not found"),
    ],
)
def test_bad_arguments_exit_2(tiny, tmp_path, capsys, args, message) -> None:
    rc = fidelity.main([*tiny["model"], "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_reference_npz_with_foreign_class_list_is_refused(tmp_path) -> None:
    rng = np.random.default_rng(2)
    classes = [{"id": i, "name": f"c{i}", "emoji": chr(0x1F600 + i)} for i in range(4)]
    path = tmp_path / "ref.npz"
    np.savez(
        path,
        images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
        labels=np.arange(8) % 4,
        classes=np.asarray(json.dumps(classes)),
    )

    class Mean(features.FeatureExtractor):
        def features(self, images: torch.Tensor) -> torch.Tensor:
            return images.mean(dim=(2, 3))

    ref = features.load_reference(path, Mean(), [1, 2], 4, classes)
    assert ref.class_restricted and ref.n == 4 and ref.mu.shape == (3,)
    moved = classes[1:] + classes[:1]
    with pytest.raises(ConfigError, match="another class list"):
        features.load_reference(path, Mean(), [1, 2], 4, moved)


def test_class_lists() -> None:
    assert fidelity._classes("0,5, 9") == [0, 5, 9]
    assert fidelity._classes("0-3,10-20:5") == [0, 1, 2, 3, 10, 15, 20]
    for bad in ("3-1", "a-b", "1,1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            fidelity._classes(bad)
    assert fidelity._budgets("1/2,0.25,64") == [0.5, 0.25, 64] and fidelity._budgets("1/4") == [0.25]
    assert fidelity._sampling_list("cfg=2,t=0.9; cfg=1.5,top_k=100,p=0.95;") == [
        {"cfg_scale": 2.0, "temperature": 0.9},
        {"cfg_scale": 1.5, "top_k": 100, "top_p": 0.95},
    ]
    for bad in ("cfg", "warmth=2", "top_k=1.5", ";"):
        with pytest.raises(argparse.ArgumentTypeError):
            fidelity._sampling_list(bad)


def test_missing_out_is_a_usage_error(capsys) -> None:
    assert fidelity.main(["--policies", "adsa"]) == 2
    assert "--out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The demo model, when its assets are in the tree


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEMO_DIR / "config.json").is_file(),
    reason="demo assets (adsa_core/assets/demo/config.json) are not in the tree yet",
)
def test_demo_two_classes_one_seed(tmp_path, capsys) -> None:
    """Two passes of 256 steps (2 dense + 2 adsa free-running, then 2 teacher-forced): 30 s on an idle
    2-core CPU, 40 s on a busy one, nearly all of it the engine's CPU attention oracle."""
    out = tmp_path / "demo"
    rc = fidelity.main(
        [
            "--device",
            "cpu",
            "--policies",
            "adsa",
            "--budgets",
            "0.25",
            "--classes",
            "0,1",
            "--seeds",
            "1",
            "--batch-size",
            "4",
            "--no-dense-check",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report, rows = _rows(out)
    dense = next(r for r in report["rows"] if r["policy"] == "dense")
    sparse = next(r for r in report["rows"] if r["policy"] == "adsa")
    assert dense["kl"] == 0 and sparse["kl"] > 0 and sparse["budget_tokens"] == round(0.25 * report["seq_len"])
    assert "recognition_acc" in dense  # the demo ships its classifier
    assert (out / "grid.png").is_file()


def test_help_examples_fit_the_demo_model() -> None:
    """Every class range `adsa-fidelity --help` shows exists in the embedded demo model."""
    num_classes = json.loads((DEMO_DIR / "config.json").read_text())["gpt"]["num_classes"]
    ranges = re.findall(r"\b(\d+)-(\d+)(?::\d+)?\b", fidelity.build_parser().format_help())
    assert ranges, "the help shows no class range"
    assert [(lo, hi) for lo, hi in ranges if int(hi) >= num_classes] == []
