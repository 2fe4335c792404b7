"""The skinny matmul kernel on the device (-m gpu): against a float64 matmul at GPT-XL's weight shapes and every
row count it takes, as `SkinnyLinear` under torch.compile (the custom op inside a graph, with the sum over slices
fused after it) and captured in a CUDA graph, as the engine's step runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines too; the marker deselects it there
    pytest.skip("needs a CUDA device", allow_module_level=True)

from adsa_core.config import gpt_preset  # noqa: E402
from adsa_core.model.llamagen import FeedForward, RMSNorm, SkinnyLinear  # noqa: E402
from adsa_core.model.skinny_matmul import MAX_ROWS, partials, takes  # noqa: E402


def captured(fn, *inputs):
    """fn compiled and warmed up off the capture, then captured in a CUDA graph: (graph, its outputs)."""
    with torch.cuda.stream(torch.cuda.Stream()):
        fn(*inputs)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*inputs)
    return g, out


GPT_XL = {"wqkv": (3840, 1280), "wo": (1280, 1280), "w13": (7168, 1280), "w2": (1280, 3584), "output": (16384, 1280)}


@pytest.mark.parametrize("name", list(GPT_XL))
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_the_kernel_matches_a_float64_matmul(name, rows):
    N, K = GPT_XL[name]
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    want = x.double() @ w.double().T
    got = partials(x, w)
    assert got.dtype == torch.float32 and got.shape[1:] == (rows, N)
    torch.testing.assert_close(got.sum(0).double(), want, rtol=1e-3, atol=1e-3)  # fp32 sums of exact bf16 products


def test_the_engines_feed_forward_compiled_and_graphed_matches_float64():
    """As the engine's compiled step runs the feed-forward at a few rows: the fused w1/w3 through the kernel
    (FeedForward after fuse()), the SwiGLU adding its 5 slices, w2 through the kernel as a SkinnyLinear."""
    torch.manual_seed(0)
    ff = FeedForward(gpt_preset("GPT-XL", 384)).to("cuda", torch.bfloat16)
    ff.fuse()
    ff.w2 = SkinnyLinear(ff.w2.weight)
    x = torch.randn(2, 1, 1280, device="cuda", dtype=torch.bfloat16)
    assert ff.w13.shape == GPT_XL["w13"] and takes(x, ff.w13)
    assert not takes(torch.randn(MAX_ROWS + 1, 1280, device="cuda", dtype=torch.bfloat16), ff.w13)
    g, out = captured(torch.compile(ff, dynamic=False), x)
    x.copy_(torch.randn_like(x))  # the graph reads the new input
    g.replay()
    gate, up = (x.double() @ ff.w13.double().T).chunk(2, dim=-1)
    want = (F.silu(gate) * up) @ ff.w2.weight.double().T
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("shape", [GPT_XL["wo"], GPT_XL["w2"]])
def test_the_engines_use_compiled_and_graphed_matches_float64(shape):
    """As the compiled step runs wo and w2: the product, the residual add and the next RMSNorm in one graph, whose
    norm kernel adds the kernel's slices (10 for wo, 13 for w2: the tuned launches)."""
    N, K = shape
    layer = SkinnyLinear(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5)
    norm = RMSNorm(N).to("cuda", torch.bfloat16)

    def post(x, h):  # x: (B, 1, K) the product's input, h: (B, 1, N) the residual stream
        h = h + layer(x)
        return h, norm(h)

    compiled = torch.compile(post, dynamic=False)
    x = torch.randn(8, 1, K, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(8, 1, N, device="cuda", dtype=torch.bfloat16)
    g, (out_h, out_norm) = captured(compiled, x, h)
    x.copy_(torch.randn_like(x))  # the graph reads the new inputs
    h.copy_(torch.randn_like(h))
    g.replay()
    want_h = h.double() + x.double() @ layer.weight.double().T
    want_norm = want_h * torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(out_h.double(), want_h, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_norm.double(), want_norm, rtol=3e-2, atol=3e-2)
