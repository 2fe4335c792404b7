"""The skinny matmul kernel under Triton's CPU interpreter (TRITON_INTERPRET=1) against a float64 matmul: every
launch shape the sweep can pick (stripes that overhang N, slices of K that overhang K, one slice, several), on
small fp32 shapes. tests/model/test_skinny_matmul_gpu.py covers the compiled kernel at GPT-XL's shapes and its
place in the compiled step. Runs in a child process: the interpreter is chosen when the kernel module is imported.
"""

from __future__ import annotations

import os


def test_kernel_matches_a_float64_matmul_under_the_interpreter(under_triton_interpreter):
    assert "skinny cases match" in under_triton_interpreter(__file__)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from adsa_core.model.skinny_matmul import MAX_ROWS, SkinnyConfig, partials

    torch.manual_seed(0)
    n = 0
    for M, N, K, cfg in [
        (2, 96, 80, SkinnyConfig(32, 32, 2, 4, 2)),  # two slices, the second overhangs K (48 of 64 valid)
        (5, 40, 200, SkinnyConfig(16, 64, 3, 4, 2)),  # N not a multiple of the stripe; 3 slices asked, 2 needed
        (1, 48, 300, SkinnyConfig(16, 128, 1, 4, 1)),  # one row, one slice looping over K
        (MAX_ROWS, 64, 64, None),  # the default launch at the most rows taken
        (3, 33, 47, SkinnyConfig(16, 16, 4, 4, 2)),  # odd sizes everywhere
    ]:
        x, w = torch.randn(M, K), torch.randn(N, K)
        got = partials(x, w, cfg)
        assert got.dtype == torch.float32 and got.shape[1:] == (M, N)
        torch.testing.assert_close(got.sum(0).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)
        n += 1
    try:
        partials(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8))
    except ValueError as e:
        assert "M <=" in str(e)
    else:
        raise AssertionError("too many rows were accepted")
    print(f"{n} skinny cases match")


if __name__ == "__main__":
    main()
