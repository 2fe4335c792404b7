"""The fused Triton sampling kernel against `sample_tokens`, the torch oracle (run on the device machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

from adsa_core.sampling import cfg_combine, sample_tokens, uniform_from

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines too; the marker deselects it there
    pytest.skip("needs a CUDA device", allow_module_level=True)

from adsa_core.sampling_kernel import sample_guided_triton  # noqa: E402


def case(W: int, V: int, seed: int, ties: bool) -> dict:
    """Items with every setting mixed in one batch: CFG on/off, temperature, top-k (off, 1, LlamaGen's 2000,
    the whole vocabulary), top-p, greedy; logits optionally rounded to bf16 (many exact ties)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(2 * W, V, device="cuda", generator=g) * 3
    if ties:
        logits = logits.bfloat16().float()
    i = torch.arange(W, device="cuda")
    return dict(
        logits=logits,
        cond=2 * i,
        uncond=2 * i + 1,
        active=i % 3 != 0,
        cfg_scale=torch.full((W,), 4.0, device="cuda"),
        temperature=torch.tensor([1.0, 0.7, 1.3, 0.5], device="cuda")[i % 4],
        top_k=torch.tensor([0, 2000, 1, V, 50], device="cuda")[i % 5],
        top_p=torch.tensor([1.0, 0.9, 0.5, 1.0, 0.99, 0.1, 1.0], device="cuda")[i % 7],
        greedy=(i % 8 == 3).long(),
        seeds=i * 7919 + seed,
        positions=i % 576,
    )


def oracle(c: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    c = {k: v.to(device) for k, v in c.items()}
    cond, uncond = c["logits"][c["cond"]], c["logits"][c["uncond"]]
    guided = torch.where(c["active"].view(-1, 1), cfg_combine(cond, uncond, c["cfg_scale"]), cond)
    tok = sample_tokens(guided, c["seeds"], c["positions"], c["temperature"], c["top_k"], c["top_p"],
                        c["greedy"].bool())
    return guided, tok


def kernel(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    guided = torch.full((len(c["cond"]), c["logits"].shape[1]), float("nan"), device="cuda")
    tok = sample_guided_triton(c["logits"], c["cond"], c["uncond"], c["active"], c["cfg_scale"], c["temperature"],
                               c["top_k"], c["top_p"], c["greedy"], uniform_from(c["seeds"], c["positions"]), guided)
    return guided, tok


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "bf16-ties"])
@pytest.mark.parametrize("V", [16384, 1000])
def test_kernel_draws_the_oracles_tokens(V, ties):
    agree = agree_cpu = total = 0
    for seed in range(4):
        c = case(256, V, seed, ties)
        guided, tok = kernel(c)
        guided_gpu, tok_gpu = oracle(c, "cuda")
        guided_cpu, tok_cpu = oracle(c, "cpu")
        assert torch.equal(guided, guided_gpu), "CFG must be bit-identical to torch's"
        greedy = c["greedy"].bool()
        assert torch.equal(tok[greedy], tok_gpu[greedy]), "greedy is an exact arg-max (lowest index on ties)"
        agree += int((tok == tok_gpu).sum())
        agree_cpu += int((tok.cpu() == tok_cpu).sum())
        total += tok.numel()
        kept = torch.full_like(guided, True, dtype=torch.bool)
        k = c["top_k"]
        has_k = (k > 0) & (k < V)
        kth = guided.div(c["temperature"].view(-1, 1)).sort(dim=-1, descending=True).values.gather(
            1, (k - 1).clamp(0, V - 1).view(-1, 1))
        kept[has_k] = (guided.div(c["temperature"].view(-1, 1)) >= kth)[has_k]
        assert kept.gather(1, tok.view(-1, 1)).all(), "a token below its row's k-th largest was drawn"
    rate, rate_cpu = agree / total, agree_cpu / total
    print(f"token agreement, V={V}, ties={ties}: kernel vs torch on the GPU {rate:.5f} ({agree}/{total}), "
          f"vs torch on the CPU {rate_cpu:.5f}")
    assert rate >= 0.995 and rate_cpu >= 0.995


def test_kernel_tokens_do_not_depend_on_batch_neighbours():
    c = case(64, 16384, 7, ties=True)
    _, batched = kernel(c)
    for i in range(0, 64, 5):
        alone = {k: (v if k == "logits" else v[i: i + 1]) for k, v in c.items()}
        assert kernel(alone)[1][0] == batched[i], i


def test_kernel_draws_follow_the_distribution():
    """Many seeds on one row: token frequencies match the filtered softmax (top-k 5, temperature 0.8)."""
    n, V = 20000, 64
    row = torch.randn(1, V, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    logits = row.expand(2 * n, V).contiguous()
    i = torch.arange(n, device="cuda")
    c = dict(logits=logits, cond=2 * i, uncond=2 * i + 1, active=torch.zeros(n, dtype=torch.bool, device="cuda"),
             cfg_scale=torch.ones(n, device="cuda"), temperature=torch.full((n,), 0.8, device="cuda"),
             top_k=torch.full((n,), 5, device="cuda"), top_p=torch.ones(n, device="cuda"),
             greedy=torch.zeros(n, dtype=torch.long, device="cuda"), seeds=i + 12345, positions=i % 576)
    _, tok = kernel(c)
    probs = torch.zeros(V, device="cuda")
    top = (row[0] / 0.8).topk(5)
    probs[top.indices] = top.values.softmax(0)
    freq = torch.bincount(tok, minlength=V).float() / n
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.015  # ~4 standard errors of a frequency near 0.3 at n = 20000


def check_step_kernel(W: int, V: int, device: str, monkeypatch) -> float:
    """sample_and_feed with the kernel doing the step's bookkeeping against its torch path, on one device: the
    uniforms bit for bit (uniform_from's hash compiled), the CFG guidance bit for bit, codes, fed rows,
    positions and j as torch writes them. Returns the token agreement (draws within an ulp of a boundary may
    differ, as in test_kernel_draws_the_oracles_tokens)."""
    from types import SimpleNamespace

    import adsa_core.engine.sampler as sampler
    from adsa_core.engine.sampler import FLOAT_FIELDS, INT_FIELDS, StepBatch, sample_and_feed
    from adsa_core.sampling_kernel import sample_and_feed_triton

    L, T, R = 64, 1, 2 * W
    g = torch.Generator(device=device).manual_seed(11)
    i = torch.arange(W, device=device)
    on = dict(device=device)
    f = dict(cond=2 * i, uncond=2 * i + 1, seed=i * 7919 - 3 * 2**40, j=(i * 53) % (L + 8),  # some j past the end
             cfg_interval=torch.tensor([-1, 10, 0, 40], **on)[i % 4],
             top_k=torch.tensor([0, 2000, 1, V, 50], **on)[i % 5],
             greedy=(i % 8 == 3).long(), forced=(i % 6 == 1).long(), slot=i,
             row=torch.randperm(R, generator=g, **on)[:W], owner=torch.randperm(W, generator=g, **on),
             cfg_scale=torch.tensor([4.0, 1.0, 1.5], **on)[i % 3],
             temperature=torch.tensor([1.0, 0.7, 1.3], **on)[i % 3],
             top_p=torch.tensor([1.0, 0.9, 0.5, 1.0], **on)[i % 4])
    ints = torch.stack([f[k].long() for k in INT_FIELDS])
    floats = torch.stack([f[k].float() for k in FLOAT_FIELDS])
    logits = torch.randn(R, V, generator=g, **on) * 3
    forced = torch.randint(0, V, (W, L), generator=g, **on)
    runs = []
    for kernel in (False, True):
        monkeypatch.setattr(sampler, "uses_sampling_kernel", lambda d, kernel=kernel: kernel)
        b = StepBatch.of(ints.clone(), floats.clone())
        rows = SimpleNamespace(tokens=torch.full((R,), -1, **on), positions=torch.full((R,), -1, **on))
        codes, guided = torch.full((W, L), -1, **on), torch.full((W, V), float("nan"), **on)
        sample_and_feed(b, logits, 0, codes, forced, rows, T, guided)  # type: ignore[arg-type]
        runs.append(dict(codes=codes, guided=guided, tokens=rows.tokens, positions=rows.positions, j=b.j))
    want, got = runs
    assert torch.equal(got["guided"], want["guided"]), "CFG must be bit-identical to torch's"
    assert torch.equal(got["positions"], want["positions"]) and torch.equal(got["j"], want["j"])
    assert torch.equal(got["j"], f["j"] + 1)
    written = want["codes"] >= 0
    assert torch.equal(got["codes"] >= 0, written) and int(written.sum()) == W  # the same cells, one an item
    tok, want_tok = got["codes"][written], want["codes"][written]  # item order: slot = item
    forced_items = f["forced"].bool()
    assert torch.equal(tok[forced_items], want_tok[forced_items]), "forced tokens are copied, not drawn"
    greedy = f["greedy"].bool() & ~forced_items
    assert torch.equal(tok[greedy], want_tok[greedy]), "greedy is an exact arg-max"
    assert torch.equal(got["tokens"] >= 0, want["tokens"] >= 0)  # the same rows fed
    assert torch.equal(got["tokens"][f["row"]], tok[f["owner"]]), "each row gets its owner's token"
    _, _, u = sample_and_feed_triton(logits, StepBatch.of(ints.clone(), floats.clone()), torch.zeros_like(forced),
                                     forced, T, torch.empty(W, V, **on))
    assert torch.equal(u, uniform_from(f["seed"], f["j"])), "uniform_from's hash, compiled, bit for bit"
    return float((tok == want_tok).float().mean())


def test_the_step_kernel_does_the_torch_steps_bookkeeping(monkeypatch):
    rate = check_step_kernel(256, 16384, "cuda", monkeypatch)
    print(f"token agreement, step kernel vs torch step: {rate:.5f}")
    assert rate >= 0.99
