"""The decode step's sampling kernel with the item bookkeeping inside it (`sample_and_feed` on CUDA) does what
the bookkeeping spelled out here in torch does around the token-only kernel, run by Triton's CPU interpreter:
the same uniforms (uniform_from's hash, bit for bit), guided logits, tokens, codes, fed rows, positions and j."""

from __future__ import annotations


def test_feed_in_the_kernel_matches_the_torch_bookkeeping(under_triton_interpreter):
    assert "feed matches" in under_triton_interpreter(__file__)


def main() -> None:
    from types import SimpleNamespace

    import torch

    import adsa_core.engine.sampler as sampler
    from adsa_core.engine.sampler import FLOAT_FIELDS, INT_FIELDS, StepBatch, sample_and_feed
    from adsa_core.sampling import uniform_from
    from adsa_core.sampling_kernel import sample_guided_triton

    sampler.uses_sampling_kernel = lambda device: True  # the interpreter runs Triton on CPU tensors
    W, V, L, R, slots, T = 12, 300, 10, 20, 6, 7
    g = torch.Generator().manual_seed(0)
    i = torch.arange(W)
    # every case mixed: CFG on/off/over its interval, seeds past 32 bits and negative, j past the end (padding),
    # forced and greedy items, rows fed in another order than the items
    f = dict(cond=2 * i % R, uncond=(2 * i + 1) % R, seed=torch.tensor([0, 1, -5, 2**40 + 3, 2**62, -(2**50)] * 2),
             j=torch.tensor([0, 3, 6, 8, 14, 2, 1, 4, 7, 12, 0, 5]),  # items 4 and 9 (forced) past the end
             cfg_interval=torch.tensor([-1, 2, 5, 0, -1, 20] * 2),
             top_k=torch.tensor([0, 50, 1, V] * 3), greedy=(i % 5 == 4).long(), forced=(i % 4 == 1).long(),
             slot=i % slots, row=torch.randperm(R, generator=g)[:W], owner=i.flip(0),
             cfg_scale=torch.tensor([4.0, 1.0, 1.5] * 4), temperature=torch.tensor([1.0, 0.7, 1.3] * 4),
             top_p=torch.tensor([1.0, 0.9, 0.5, 1.0] * 3))
    ints = torch.stack([f[k].long() for k in INT_FIELDS])
    floats = torch.stack([f[k].float() for k in FLOAT_FIELDS])
    logits = torch.randn(R, V, generator=g) * 3
    forced = torch.randint(0, V, (slots, L), generator=g)

    # the oracle: the step's bookkeeping written out, around the kernel's token-only entry
    j = f["j"]
    jc = j.clamp_max(L - 1)
    active = (f["cfg_scale"] > 1.0) & ((f["cfg_interval"] < 0) | (j <= f["cfg_interval"] + 1))
    u = uniform_from(f["seed"], j)
    want_guided = torch.full((W, V), float("nan"))
    tok = sample_guided_triton(logits, f["cond"], f["uncond"], active, f["cfg_scale"], f["temperature"], f["top_k"],
                               f["top_p"], f["greedy"], u, want_guided)
    tok = torch.where(f["forced"].bool(), forced[f["slot"], jc], tok)
    want_codes = torch.full((slots, L), -1)
    want_codes[f["slot"], jc] = tok
    want_tokens, want_positions = torch.full((R,), -1), torch.full((R,), -1)
    want_tokens[f["row"]] = tok[f["owner"]]
    want_positions[f["row"]] = jc[f["owner"]] + T

    b = StepBatch.of(ints.clone(), floats.clone())
    rows = SimpleNamespace(tokens=torch.full((R,), -1), positions=torch.full((R,), -1))
    codes, guided = torch.full((slots, L), -1), torch.full((W, V), float("nan"))
    sample_and_feed(b, logits, 0, codes, forced, rows, T, guided)  # type: ignore[arg-type]
    for name, got, want in (("guided", guided, want_guided), ("codes", codes, want_codes),
                            ("tokens", rows.tokens, want_tokens), ("positions", rows.positions, want_positions),
                            ("j", b.j, j + 1)):
        assert torch.equal(got, want), name
    assert (want_codes >= 0).sum() == W and 0 < active.sum() < W  # distinct cells; CFG both on and off

    from adsa_core.sampling_kernel import sample_and_feed_triton

    b = StepBatch.of(ints.clone(), floats.clone())
    _, _, got_u = sample_and_feed_triton(logits, b, torch.zeros(slots, L, dtype=torch.long), forced, T,
                                         torch.zeros(W, V))
    assert torch.equal(got_u, u), (got_u, u)
    print("feed matches")


if __name__ == "__main__":
    main()
