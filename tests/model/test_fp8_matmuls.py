"""fp8 matmuls (`ModelSpec.matmul_dtype="fp8"`, adsa_core/model/fp8.py) against an independent reference: the
row-wise rounding to e4m3 written out with a search of the e4m3 code table, and a full-precision matmul of the
rounded values; then the engine running the fp8 model."""

from __future__ import annotations

import pytest
import torch

from adsa_core.config import CacheConfig, ConfigError, EngineConfig
from adsa_core.engine import Engine, Finished, GenerationRequest
from adsa_core.loading import ModelSpec, check_matmul_dtype, load_models
from adsa_core.model.fp8 import Fp8Linear
from adsa_core.sampling import SamplingParams

E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every e4m3 bit pattern


def rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled so its largest magnitude is 448, rounded to the nearest e4m3 value (searching the
    code table, not casting), scaled back."""
    scale = x.abs().amax(-1, keepdim=True) / 448.0
    grid = E4M3_VALUES[torch.isfinite(E4M3_VALUES)].unique()  # sorted
    y = (x / scale).clamp(-448, 448)
    hi = torch.searchsorted(grid, y.contiguous()).clamp(1, len(grid) - 1)
    lo_v, hi_v = grid[hi - 1], grid[hi]
    nearest = torch.where((y - lo_v) <= (hi_v - y), lo_v, hi_v)  # ties: either (measure zero for random data)
    return nearest * scale


def test_fp8_linear_is_a_matmul_of_rows_rounded_to_e4m3():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.linspace(0.01, 3.0, 96)[:, None]  # rows of very different ranges
    x = torch.randn(2, 8, 64) * 5.0
    lin = Fp8Linear(w)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.shape == (1, 96)
    want = rounded_rows(x.reshape(16, 64)) @ rounded_rows(w).t()
    got = lin(x)
    assert got.shape == (2, 8, 96)
    torch.testing.assert_close(got.reshape(16, 96), want, rtol=1e-5, atol=1e-5)
    assert (got.reshape(16, 96) - x.reshape(16, 64) @ w.t()).abs().max() > 1e-3  # it does round


def test_the_engine_runs_the_fp8_model():
    """Teacher-forced through the engine (beside a neighbour in the batch), the log-probs are the fp8 model's,
    not the full-precision one's. Not equal to the whole-sequence forward: rounding activations to 3 mantissa
    bits turns the ~1e-6 differences of two attention paths into whole steps now and then, which the KV cache
    carries on (KL 0.04 per token on these random tokens, against 0.14 between fp8 and fp32)."""
    models = load_models(ModelSpec(device="cpu", matmul_dtype="fp8"))
    ff = models.gpt.layers[0].feed_forward
    assert isinstance(models.gpt.layers[0].attention.wqkv, Fp8Linear) and isinstance(ff.w13, Fp8Linear)
    T = models.gpt_config.block_size
    forced = torch.randint(0, models.gpt_config.vocab_size, (T,), generator=torch.Generator().manual_seed(1))
    eng = Engine(models, EngineConfig(max_batch_size=2, decode_images=False,
                                      default_cache=CacheConfig(policy="dense", budget=None)))  # as the whole model
    got: list = []
    eng.submit(GenerationRequest(condition=5, seed=0, sampling=SamplingParams(cfg_scale=1.0), forced_tokens=forced,
                                 want_logits=True, request_id="f"), got.append)
    eng.submit(GenerationRequest(condition=9, seed=1, request_id="g"), got.append)
    while eng.has_work:
        eng.step()
    eng.close()
    engine = [ev for ev in got if isinstance(ev, Finished) and ev.logprobs is not None][0].logprobs

    def kl(model) -> float:
        with torch.no_grad():
            whole = torch.log_softmax(model(forced[None, :-1], torch.tensor([5]))[0], -1)
        return float((whole.exp() * (whole - engine)).sum(-1).mean())

    to_fp8, to_fp32 = kl(models.gpt), kl(load_models(ModelSpec(device="cpu")).gpt)
    assert to_fp8 < 0.5 * to_fp32, (to_fp8, to_fp32)


def test_a_matmul_dtype_that_cannot_run_is_refused():
    with pytest.raises(ConfigError, match="choose one of"):
        load_models(ModelSpec(device="cpu", matmul_dtype="int4"))
    check_matmul_dtype("fp8", torch.device("cpu"), torch.float32)  # a CPU runs it in any dtype
