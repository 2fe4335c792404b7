"""config.parse_budget, the one reading of a KV budget written as text, and the four places that read one:
adsa-generate, adsa-fidelity, the load generator and the server's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adsa_core import cli
from adsa_core.config import CacheConfig, ConfigError, GPTConfig, gpt_preset, min_budget, parse_budget
from adsa_core.eval import fidelity
from loadtest.cli import build_run_parser, workload_from_args
from server.__main__ import load_settings
from server.settings import Settings


@pytest.mark.parametrize(
    "text,want",
    [
        ("256", 256), ("1", 1), (" +12 ", 12),  # ints are token counts
        ("0.25", 0.25), ("2.5e-1", 0.25), ("1/4", 0.25), ("1.0", 1.0), (".5", 0.5),  # floats are fractions
        ("none", None), ("FULL", None), (" None ", None),  # the whole sequence: no eviction
    ],
)  # fmt: skip
def test_valid_budgets(text, want):
    got = parse_budget(text)
    assert got == want and type(got) is type(want)
    assert CacheConfig(budget=got).budget == want  # every parsed value is a valid CacheConfig budget


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "is not a token count"), ("lots", "is not a token count"), ("1/0", "is not a token count"),
        ("1/x", "is not a token count"), ("--3", "is not a token count"), ("0x10", "is not a token count"),
        ("0", "must be positive"), ("-3", "must be positive"),
        ("1.5", r"outside \(0, 1\]"), ("0.0", r"outside \(0, 1\]"), ("2/1", r"outside \(0, 1\]"),
        ("1e3", r"outside \(0, 1\]"), ("nan", r"outside \(0, 1\]"), ("inf", r"outside \(0, 1\]"),
    ],
)  # fmt: skip
def test_bad_budgets_say_why(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_budget(text)


def test_generate_reads_budgets_with_it(capsys):
    p = cli.build_parser()
    assert p.parse_args(["--kv-budget", "1/4"]).kv_budget == 0.25
    assert p.parse_args(["--kv-budget", "none"]).kv_budget is None
    assert p.parse_args([]).kv_budget == CacheConfig().budget
    assert cli.main(["--policy", "adsa", "--kv-budget", "lots", "--class-labels", "1", "--codes-out", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "adsa-generate: error: argument --kv-budget: kv budget 'lots' is not a token count (256), "
        "a fraction (0.25, 1/4) or none"
    )


def test_fidelity_reads_budgets_with_it():
    a = fidelity.build_parser().parse_args(["--budgets", "1/2, 0.25,64", "--sweep-budget", "1/6", "--out", "x"])
    assert a.budgets == [0.5, 0.25, 64] and a.sweep_budget == [1 / 6]
    with pytest.raises(fidelity.UsageError, match="argument --budgets: kv budget fraction 1.5 is outside"):
        fidelity.build_parser().parse_args(["--budgets", "0.5,1.5", "--out", "x"])


def test_loadtest_reads_budgets_with_it():
    args = build_run_parser().parse_args(["--classes", "1", "--budgets", "256,1/4,full,default"])
    assert workload_from_args(args).kv_budgets == [256, 0.25, 1.0, None]  # full: 1.0; default: the server's
    with pytest.raises(ConfigError, match="kv budget '1/0'"):
        workload_from_args(build_run_parser().parse_args(["--classes", "1", "--budgets", "1/0"]))


def test_loadtest_stays_free_of_torch():
    code = "import sys, loadtest.cli; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_server_settings_read_budgets_with_it(monkeypatch, capsys):
    monkeypatch.setenv("ADSA_KV_BUDGET", "1/4")
    assert Settings(_env_file=None).kv_budget == 0.25
    monkeypatch.setenv("ADSA_KV_BUDGET", "full")
    assert Settings(_env_file=None).kv_budget is None
    monkeypatch.setenv("ADSA_KV_BUDGET", "-3")
    with pytest.raises(SystemExit) as e:
        load_settings([])
    assert e.value.code == 2
    assert "invalid setting kv_budget: Value error, kv budget -3 tokens must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("budget, message", [
    (1, "kv budget 1 token must be larger than prefix 1 + local window 9 (an integer counts tokens: the whole cache is "
        "1.0)"),  # JSON clients (JavaScript's JSON.stringify(1.0) is "1") meant the whole cache
    (4, "kv budget 4 tokens must be larger than prefix 1 + local window 9"),
])  # fmt: skip
def test_a_budget_too_small_for_its_regions_says_so(budget, message):
    cfg = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=64, num_classes=10)
    with pytest.raises(ConfigError) as e:
        CacheConfig(policy="adsa", budget=budget, local=9).resolve(cfg)
    assert str(e.value) == message
    assert CacheConfig(policy="adsa", budget=1.0).resolve(cfg).budget == cfg.seq_len


DEMO_GRID = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=256, num_classes=10)


@pytest.mark.parametrize("cfg, regions, expected", [
    (DEMO_GRID, {}, 19),
    (gpt_preset("GPT-XL", 384), {}, 27),  # larger than prefix 1 + local one row + 1 (25)
    (gpt_preset("GPT-XL", 512), {}, 35),
    (gpt_preset("GPT-B", 256, model_type="t2i"), {}, 138),  # the prefix holds the 120 condition tokens, then 17 local
    (DEMO_GRID, {"local": 64}, 66),  # a server's ADSA_KV_LOCAL
    (DEMO_GRID, {"prefix": 1, "local": 3}, 5),
], ids=["demo", "xl384", "xl512", "t2i", "local-64", "prefix-1-local-3"])  # fmt: skip
def test_min_budget_is_where_every_sparse_budget_starts_to_resolve(cfg, regions, expected):
    """The playground's slider runs from min_budget to seq_len: every budget there must run, none below it, with the
    server's own prefix and local window."""
    assert min_budget(cfg, **regions) == expected
    for budget in range(1, cfg.seq_len + 1):
        for policy in ("adsa", "line", "window"):
            if budget < expected:
                with pytest.raises(ConfigError):
                    CacheConfig(policy=policy, budget=budget, **regions).resolve(cfg)
            else:
                assert CacheConfig(policy=policy, budget=budget, **regions).resolve(cfg).budget == budget
