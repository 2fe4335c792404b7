"""tools/bench_vq_decode.py's compile_channel_stats variant computes the decoder's GroupNorm another way; here it
is held to torch's own GroupNorm (float64, where the two orders of summation agree to rounding), alone and
inside a whole (small) decoder. The GPU variants themselves run on the device (docs/PERFORMANCE.md run 35)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adsa_core.config import VQConfig
from adsa_core.model.vq import VQModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tool imports its sibling scripts
import bench_vq_decode  # noqa: E402


@pytest.mark.parametrize("shape, offset", [((2, 128, 16, 16), 0.0), ((3, 256, 8, 5), 5.0), ((1, 512, 4, 4), -30.0),
                                           ((2, 64, 7), 2.0)])
def test_channel_stats_group_norm_is_torchs_group_norm(shape, offset):
    torch.manual_seed(0)
    c = shape[1]
    norm = bench_vq_decode.ChannelStatsGroupNorm(32, c, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # channels far from each other and from zero: a group's variance is mostly between its channels' means
    x = 0.3 * torch.randn(shape, dtype=torch.float64) + offset + torch.randn(1, c, *(1,) * (len(shape) - 2),
                                                                            dtype=torch.float64)
    ref = F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=1e-12)
    # bf16 in, bf16 out, fp32 statistics: within bf16's rounding of torch's result
    xb = x.to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.group_norm(xb.float(), 32, norm.weight.float(), norm.bias.float(),
                                                         1e-6), rtol=1e-2, atol=2e-2)


def test_channel_stats_decoder_decodes_the_same_images():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32,
                          ch=32)).double().eval()
    codes = torch.randint(0, 64, (2, 16))
    decode = bench_vq_decode.channel_stats_decoder(vq)
    swapped = [m for m in decode.__self__.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert swapped and all(type(m) is bench_vq_decode.ChannelStatsGroupNorm for m in swapped)
    assert all(type(m) is torch.nn.GroupNorm for m in vq.modules() if isinstance(m, torch.nn.GroupNorm))  # a copy
    with torch.no_grad():
        torch.testing.assert_close(decode(codes), vq.decode_code(codes), rtol=0, atol=1e-10)


def test_engine_bench_wrapper_builds_channel_stats_decoders(tmp_path, monkeypatch):
    """tools/bench_engine_channel_stats.py: the bench's models decode with ChannelStatsGroupNorm, end to end."""
    import bench_engine_channel_stats

    import adsa_core.model.vq as vq_module
    from adsa_core.eval import bench

    built: list[VQModel] = []
    real_random_models = bench.random_models

    def record(*args, **kwargs):
        models = real_random_models(*args, **kwargs)
        built.append(models.vq)
        return models

    monkeypatch.setattr(bench, "random_models", record)
    monkeypatch.setattr(vq_module, "group_norm", vq_module.group_norm)  # restored after the test
    assert bench_engine_channel_stats.main(["--smoke", "--device", "cpu", "--waves", "1", "--policies", "adsa",
                                            "--out", str(tmp_path)]) == 0
    norms = [m for m in built[0].modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is bench_vq_decode.ChannelStatsGroupNorm for m in norms)
    assert (tmp_path / "bench.json").exists()
