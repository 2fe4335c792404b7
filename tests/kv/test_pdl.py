"""Which launches use programmatic dependent launch (kv.kernels.pdl), and the compiled decode step's choice of
compile by rows. The GPU tests of the pool, skinny-matmul and sampling kernels run them with PDL on Hopper."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adsa_core.kv.kernels import pdl  # noqa: E402
from adsa_core.model import llamagen  # noqa: E402


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if on a GPU of compute capability 9 with ADSA_PDL unset."""
    monkeypatch.setattr(pdl, "_supported", lambda device: True)


def test_cpu_launches_never_use_pdl() -> None:
    assert not pdl.use_pdl(torch.device("cpu"), 1)
    assert pdl.launch_options(torch.device("cpu"), 1) == {"PDL": False}
    assert pdl.inductor_options(torch.device("cpu")) == {}


def test_adsa_pdl_0_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADSA_PDL", "0")
    pdl._supported.cache_clear()
    try:
        assert not pdl._supported(torch.device("cuda", 0))  # decided before the capability is asked for
    finally:
        pdl._supported.cache_clear()


def test_only_steps_of_few_rows_launch_with_pdl(hopper: None) -> None:
    gpu = torch.device("cuda", 0)
    assert pdl.launch_options(gpu, 1) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_options(gpu, pdl.MAX_ROWS) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_options(gpu, pdl.MAX_ROWS + 1) == {"PDL": False}  # batch 512's pool kernel lost 6 % with it


def test_the_decode_compile_is_chosen_by_rows(hopper: None, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[dict] = []

    def fake_compile(fn, dynamic=None, options=None):  # records which compile ran each call
        tag = options or {}
        compiled.append(tag)
        return lambda *args: (tag, fn(*args))

    monkeypatch.setattr(llamagen.torch, "compile", fake_compile)
    step = llamagen._compile_decode(lambda block, x: x.shape[0], torch.device("cuda", 0))
    expected = {"triton.enable_pdl": True} if hasattr(torch._inductor.config.triton, "enable_pdl") else {}
    assert step(object(), torch.zeros(pdl.MAX_ROWS, 1, 4)) == (expected, pdl.MAX_ROWS)  # the first tensor's rows
    assert step(object(), torch.zeros(pdl.MAX_ROWS + 1, 1, 4)) == ({}, pdl.MAX_ROWS + 1)
    # a CPU model compiles once, without PDL
    compiled.clear()
    llamagen._compile_decode(lambda x: x, torch.device("cpu"))
    assert compiled == [{}]


def test_the_pool_kernel_reads_early_only_in_fused_writes_under_pdl(hopper: None) -> None:
    from adsa_core.kv.kernels import pool_attention

    gpu = torch.device("cuda", 0)
    opts = pool_attention._pdl_options
    assert opts(gpu, 1, True) == {"PDL": True, "launch_pdl": True, "EARLY": True}
    assert opts(gpu, 1, False)["EARLY"] is False  # read-only launches: the plain order
    assert opts(gpu, pdl.MAX_ROWS + 1, True) == {"PDL": False, "EARLY": False}
