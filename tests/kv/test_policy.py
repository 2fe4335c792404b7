"""The KV policy registry: one object per policy, seen by the config, the engine's mode ids and the kernel dispatch.

How a registered toy policy ranks victims is checked in test_pool_attention.py (oracle, decode step) and
test_engine.py (whole requests); here: the registry's rules and what CacheConfig makes of it."""

from __future__ import annotations

import pytest

from adsa_core.config import CacheConfig, ConfigError, GPTConfig
from adsa_core.kv import policy
from adsa_core.kv.policy import KVPolicy, get_policy, policy_mode, policy_names, register, unregister

CFG = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=32, block_size=64, num_classes=3)  # seq_len 64
# evict the lowest-positioned candidate, i.e. window's rule under another name and mode
LOWEST = KVPolicy("lowest", 9, lambda redundancy, position, attention: -position.float())


@pytest.fixture
def lowest():
    with pytest.warns(UserWarning, match="'lowest' has no Triton kernel rule"):
        register(LOWEST)
    yield LOWEST
    unregister(LOWEST.name)


def test_built_in_policies():
    assert policy_names() == ("dense", "adsa", "window", "line")
    assert [policy_mode(n) for n in policy_names()] == [0, 1, 2, 3]
    assert not get_policy("dense").evicts
    assert get_policy("adsa").evicts and get_policy("window").evicts and get_policy("line").evicts
    assert policy.kernel_covers_registry()
    with pytest.raises(ValueError, match="built in"):
        unregister("adsa")


def test_a_registered_policy_is_seen_by_the_config_and_the_dispatch(lowest):
    assert policy_names() == ("dense", "adsa", "window", "line", "lowest") and policy_mode("lowest") == 9
    r = CacheConfig(policy="lowest", budget=0.5).resolve(CFG)
    assert (r.policy, r.budget, r.evicts) == ("lowest", 32, True)
    assert not policy.kernel_covers_registry()  # CUDA decode falls back to the torch path meanwhile
    unregister("lowest")
    assert policy.kernel_covers_registry()
    with pytest.raises(ConfigError, match="unknown KV policy 'lowest'; choose one of dense, adsa, window, line$"):
        CacheConfig(policy="lowest")
    with pytest.warns(UserWarning):
        register(lowest)  # back, for the fixture's teardown


@pytest.mark.filterwarnings("ignore:KV policy")
@pytest.mark.parametrize(
    "candidate,message",
    [
        (KVPolicy("adsa", 7, None), "'adsa' is already registered"),
        (KVPolicy("other", 2, None), "mode 2 is already 'window'"),
        (KVPolicy("other", -1, None), "outside"),
        (KVPolicy("other", 2**31, None), "outside"),
    ],
)
def test_register_refuses_a_taken_name_or_mode(candidate, message):
    with pytest.raises(ValueError, match=message):
        register(candidate)
    assert policy_names() == ("dense", "adsa", "window", "line")


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown KV policy 'lru'"):
        get_policy("lru")
    with pytest.raises(ValueError, match="unknown KV policy 'lru'"):
        unregister("lru")
