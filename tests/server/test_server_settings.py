"""Settings: ADSA_* variables, generated CLI flags, mapping onto adsa_core types."""

from __future__ import annotations

import os
from typing import Literal, get_args, get_origin

import pytest
from pydantic import ValidationError

from adsa_core.config import CacheConfig, EngineConfig
from adsa_core.kv.pool import KV_CACHE_DTYPES
from adsa_core.loading import MATMUL_DTYPES
from server.__main__ import build_parser, load_settings
from server.settings import Settings


def test_defaults_follow_engine_config():
    s = Settings(_env_file=None)
    e, c = EngineConfig(), CacheConfig()
    assert (s.max_batch_size, s.max_queue, s.kv_pool_memory_fraction) == (
        e.max_batch_size,
        e.max_queue,
        e.kv_pool_memory_fraction,
    )
    assert (s.kv_policy, s.kv_budget) == (c.policy, c.budget)
    assert s.kv_cache_dtype == e.kv_cache_dtype == "auto"
    assert s.api_keys == [] and s.cors_origins == []
    spec = s.model_spec()
    assert spec.is_demo and spec.device == "auto"


def test_environment(monkeypatch):
    monkeypatch.setenv("ADSA_PORT", "9001")
    monkeypatch.setenv("ADSA_API_KEYS", "a, b,,c")
    monkeypatch.setenv("ADSA_KV_BUDGET", "256")
    monkeypatch.setenv("ADSA_DEVICE", "cpu")
    monkeypatch.setenv("ADSA_LOG_LEVEL", "DEBUG")
    s = Settings(_env_file=None)
    assert s.port == 9001 and s.api_keys == ["a", "b", "c"] and s.kv_budget == 256
    assert isinstance(s.kv_budget, int) and s.log_level == "debug"
    monkeypatch.setenv("ADSA_KV_BUDGET", "0.25")
    assert Settings(_env_file=None).kv_budget == 0.25
    monkeypatch.setenv("ADSA_KV_BUDGET", "none")
    assert Settings(_env_file=None).kv_budget is None
    monkeypatch.setenv("ADSA_DEVICE", "tpu")
    with pytest.raises(ValueError):
        Settings(_env_file=None)


def test_every_setting_has_a_flag_and_flags_beat_env(monkeypatch):
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(Settings.model_fields)
    monkeypatch.setenv("ADSA_PORT", "9001")
    monkeypatch.setenv("ADSA_MAX_QUEUE", "7")
    s = load_settings(["--port", "9002", "--kv-budget", "0.5", "--api-keys", "x,y", "--no-cuda-graphs"])
    assert s.port == 9002 and s.max_queue == 7 and s.kv_budget == 0.5 and s.api_keys == ["x", "y"]
    assert s.cuda_graphs is False


def test_every_word_setting_reads_any_case_alike_from_a_flag_and_a_variable(monkeypatch):
    """--log-level INFO as ADSA_LOG_LEVEL=INFO: each Literal setting, its first choice in capitals."""
    words = {name: get_args(f.annotation) for name, f in Settings.model_fields.items()
             if get_origin(f.annotation) is Literal}
    assert {"device", "dtype", "matmul_dtype", "compile", "kv_cache_dtype", "log_level", "log_format"} <= set(words)
    for name, choices in words.items():
        value = choices[-1]
        flag = load_settings([f"--{name.replace('_', '-')}", value.upper()])
        monkeypatch.setenv(f"ADSA_{name.upper()}", value.title())
        env = load_settings([])
        monkeypatch.delenv(f"ADSA_{name.upper()}")
        assert getattr(flag, name) == getattr(env, name) == value, name


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        load_settings(["--port", "eighty"])
    assert e.value.code == 2
    assert "port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(["--dtype", "int8"])  # argparse choices from the Literal


@pytest.mark.parametrize("argv", [["--drain-timeout-s", "inf"], ["--request-timeout-s", "nan"],
                                  ["--health-stall-s", "inf"], ["--kv-pool-memory-fraction", "nan"]])
def test_no_setting_is_infinite_or_nan(argv, capsys):
    """nan passes no bound, and an infinite drain timeout was a traceback at start-up: both are one line, exit 2."""
    with pytest.raises(SystemExit) as e:
        load_settings(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid setting {argv[0][2:].replace('-', '_')}: Input should be a finite number" in err, err


def test_engine_config_mapping():
    s = Settings(
        _env_file=None,
        kv_policy="window",
        kv_budget=128,
        kv_local=20,
        max_batch_size=4,
        kv_pool_tokens=4096,
        cuda_graphs=False,
        kv_cache_dtype="fp8",
    )
    e = s.engine_config()
    assert e.kv_cache_dtype == "fp8"
    assert e.default_cache == CacheConfig(policy="window", budget=128, local=20)
    assert (e.max_batch_size, e.kv_pool_tokens, e.cuda_graphs) == (4, 4096, False)
    assert e.compile_step is None  # compile auto: the engine turns it on for CUDA
    assert Settings(_env_file=None).engine_config().max_batch_size is None  # from the KV pool
    assert Settings(_env_file=None, compile="OFF").engine_config().compile_step is False
    assert Settings(_env_file=None, compile="on").engine_config().compile_step is True
    assert Settings(_env_file=None).engine_env() == {"ADSA_LOG_FORMAT": "text"}
    env = Settings(_env_file=None, compile_cache_dir="/cache", log_format="json").engine_env()
    assert env == {
        "ADSA_LOG_FORMAT": "json",
        "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor",
        "TRITON_CACHE_DIR": "/cache/triton",
    }


def test_an_unknown_policy_or_a_missing_checkpoint_is_refused_at_start_up(tmp_path, capsys):
    # as settings, before the server listens and the engine loads for minutes
    with pytest.raises(ValidationError, match="unknown KV policy 'nope'"):
        Settings(_env_file=None, kv_policy="nope")
    for flag in ("--gpt-ckpt", "--vq-ckpt"):
        with pytest.raises(SystemExit) as exit_:
            load_settings([flag, str(tmp_path / "missing.pt")])
        assert exit_.value.code == 2
        assert f"invalid setting {flag[2:].replace('-', '_')}: no such file: {tmp_path}/missing.pt" in (
            capsys.readouterr().err)
    (tmp_path / "gpt.pt").write_bytes(b"")
    assert load_settings(["--gpt-ckpt", str(tmp_path / "gpt.pt")]).gpt_ckpt == str(tmp_path / "gpt.pt")


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_settings(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in out and f"ADSA_{name.upper()}" in out
        if field.description and "%" in field.description:  # printed as written, not read as a format
            assert "".join(field.description.split()) in "".join(out.split())


def test_a_misspelt_setting_is_named_with_the_one_meant(monkeypatch, capsys):
    # pydantic ignores an unknown ADSA_* variable: the server would start on the default without a word
    for var in [v for v in os.environ if v.startswith("ADSA_")]:  # the developer's own shell
        monkeypatch.delenv(var)
    monkeypatch.setenv("ADSA_MAX_QUEU", "3")
    monkeypatch.setenv("ADSA_LOADTEST_URL", "http://x")  # another tool's variable, nothing like a setting
    monkeypatch.setenv("ADSA_LT_BUDGET", "0.25")  # the device load tester's, close to ADSA_KV_BUDGET
    assert load_settings([]).max_queue == Settings.model_fields["max_queue"].default
    assert capsys.readouterr().err.splitlines() == [
        "adsa-serve: warning: ADSA_MAX_QUEU is not a setting and is ignored; did you mean ADSA_MAX_QUEUE?"]


def test_vq_autotune(monkeypatch):
    # off unless asked for (its first compile takes minutes); the environment or the flag turns it on
    assert Settings(_env_file=None).engine_config().vq_autotune is False
    monkeypatch.setenv("ADSA_VQ_AUTOTUNE", "1")
    assert Settings(_env_file=None).engine_config().vq_autotune is True
    monkeypatch.delenv("ADSA_VQ_AUTOTUNE")
    assert load_settings(["--vq-autotune"]).engine_config().vq_autotune is True


def test_matmul_dtype(monkeypatch):
    # the setting offers exactly the loader's names, and reaches the model spec from the environment or the flag
    assert get_args(Settings.model_fields["matmul_dtype"].annotation) == MATMUL_DTYPES
    monkeypatch.setenv("ADSA_MATMUL_DTYPE", "fp8")
    assert Settings(_env_file=None).model_spec().matmul_dtype == "fp8"
    assert load_settings(["--matmul-dtype", "auto"]).model_spec().matmul_dtype == "auto"
    with pytest.raises(SystemExit):
        load_settings(["--matmul-dtype", "int4"])


def test_kv_cache_dtype(monkeypatch, capsys):
    # the setting offers exactly the engine's storage names
    assert get_args(Settings.model_fields["kv_cache_dtype"].annotation) == KV_CACHE_DTYPES
    monkeypatch.setenv("ADSA_KV_CACHE_DTYPE", "FP8")  # case-insensitive, like the log level
    assert Settings(_env_file=None).kv_cache_dtype == "fp8"
    assert load_settings(["--kv-cache-dtype", "auto"]).kv_cache_dtype == "auto"  # the flag wins
    assert load_settings([]).engine_config().kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit) as e:
        load_settings(["--kv-cache-dtype", "int8"])  # argparse choices from the Literal
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    monkeypatch.setenv("ADSA_KV_CACHE_DTYPE", "fp16")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Settings(_env_file=None)
    with pytest.raises(SystemExit) as e:
        load_settings([])
    assert e.value.code == 2
    assert "adsa-serve: invalid setting kv_cache_dtype: Input should be 'auto' or 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("keys", [",", " , ", ",,"])
def test_a_key_list_that_names_no_key_is_refused(keys, monkeypatch, capsys):
    """Read as 'no keys' it would run the API open to anyone, without a word; empty (or unset) still means no auth."""
    monkeypatch.setenv("ADSA_API_KEYS", keys)
    with pytest.raises(SystemExit) as e:
        load_settings([])
    assert e.value.code == 2
    assert f"invalid setting api_keys: Value error, {keys!r} names no key" in capsys.readouterr().err
    monkeypatch.setenv("ADSA_API_KEYS", "")
    assert load_settings([]).api_keys == []
    monkeypatch.setenv("ADSA_API_KEYS", " a , ,b ")
    assert load_settings([]).api_keys == ["a", "b"]
