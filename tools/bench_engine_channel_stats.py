"""adsa-bench with every VQ GroupNorm computed from per-channel statistics: the engine's side of the A/B of
tools/bench_vq_decode.py's compile_channel_stats variant, before anything lands in adsa_core.

Why a wrapper: the change is exact (tests/test_bench_vq_decode.py) but its speed on a GPU is not measured yet
(docs/PERFORMANCE.md, run 35). The engine builds its decoder through adsa_core.model.vq.group_norm, so this
script points that name at ChannelStatsGroupNorm before the bench builds a model, and passes its arguments
on to adsa-bench unchanged. Run it beside plain adsa-bench in one device call:

    python3 tools/bench_engine_channel_stats.py --presets GPT-XL --image-sizes 384 --policies adsa \
        --budgets 0.25 --waves 1 --compile --kv-cache-dtypes fp8 --dense-kv-cache-dtypes= --no-reference \
        --batches= --sparse-batches 1024 --matmul-dtypes fp8
"""

from __future__ import annotations

import sys

from bench_vq_decode import ChannelStatsGroupNorm  # a sibling script: tools/ is on the path when run

import adsa_core.model.vq as vq_module
from adsa_core.eval import bench


def channel_stats_group_norm(channels: int) -> ChannelStatsGroupNorm:
    """vq.group_norm's module (GroupNorm(32), eps 1e-6, affine), its statistics taken per channel."""
    return ChannelStatsGroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def main(argv: list[str] | None = None) -> int:
    vq_module.group_norm = channel_stats_group_norm  # every VQModel built from here on
    return bench.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
