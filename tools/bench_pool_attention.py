"""Bandwidth benchmark of the fused pool-attention kernel (run on the device machine).

Measures, in one process: a large device-to-device copy (bytes read + written: the ceiling),
then the kernel's effective bandwidth on GPT-XL-like shapes (Hkv = H = 20, D = 64, page 16,
K/V stored in bf16 or, with --kv-dtype fp8, e4m3; q always bf16) for B in {256, 512} rows and
n_slots in {144, 288, 576} (or --shapes), over a sweep of launch configurations. Bytes the
kernel must move: K + V of every valid slot, pos + stat of every valid slot, q and out.
Pages are scattered at random over the pool, as in serving.

With --write, each shape also times what the engine launches per layer, `pool_decode_triton`: the
same kernel with WRITE=True, which first writes the new token's K/V over the victim the previous
pass chose (every row full: n_stored == budget == n_slots, mode adsa, the engine's steady state
with adsa), staging the overwritten slot for the spill, then attends and picks the next victim.
Its bytes are the read-only count plus the new token read, its slot written and the spill staged;
both numbers are printed side by side. Each timed call writes the pool again (same bytes per call);
the one correctness check, against pool_decode_torch on cloned state, runs first.

Small batches are out of its reach: at a few rows a launch takes ~11 µs inside the engine's CUDA graph, and
timed alone it is mostly launch overhead (28 µs at 2 rows in run 20, with the configurations ranked by noise).
Judge launches there in the step, with tools/profile_engine.py (docs/PERFORMANCE.md, run 20).

    PYTHONUNBUFFERED=1 python3 tools/bench_pool_attention.py --out $OUT
    PYTHONUNBUFFERED=1 python3 tools/bench_pool_attention.py --kv-dtype fp8 --shapes 512x144,1024x144 --out $OUT
    PYTHONUNBUFFERED=1 python3 tools/bench_pool_attention.py --quick --write --shapes 512x144,512x288 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from adsa_core.kv.attention import pool_attention_torch, pool_decode_torch  # noqa: E402
from adsa_core.kv.decode_state import DecodeRows, LayerState  # noqa: E402
from adsa_core.kv.kernels.pool_attention import (  # noqa: E402
    default_config,
    pool_attention_triton,
    pool_decode_triton,
)
from adsa_core.kv.policy import policy_mode  # noqa: E402
from adsa_core.kv.pool import FP8, raw  # noqa: E402


def copy_bandwidth(gib: float = 2.0) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def make_pool(B, n, H, Hkv, D, page=16, kv_dtype=torch.bfloat16):
    """A pool holding exactly B rows of n valid slots (page 0 is scratch), rows' pages scattered;
    K/V stored as kv_dtype (fp8: bf16 draws, rounded), q in bf16, 1/|V| of the stored values."""
    pages = -(-n // page)
    P = B * pages + 1
    g = torch.Generator(device="cuda").manual_seed(B * n)
    k = torch.randn(P, Hkv, page, D, device="cuda", dtype=torch.bfloat16, generator=g).to(kv_dtype)
    v = torch.randn(P, Hkv, page, D, device="cuda", dtype=torch.bfloat16, generator=g).to(kv_dtype)
    block_table = (torch.randperm(P - 1, device="cuda", generator=g) + 1).view(B, pages).int()
    return dict(
        q=torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g),
        k_cache=k,
        v_cache=v,
        pos_cache=torch.randint(0, 4 * n, (P, Hkv, page), device="cuda", dtype=torch.int32, generator=g),
        stat=1.0 / v.float().norm(dim=-1).clamp_min(1e-6),
        vsum=torch.randn(B, Hkv, D, device="cuda", generator=g),
        lse=torch.full((B, H), math.log(n), device="cuda"),  # as if the previous query attended evenly
        block_table=block_table,
        n_slots=torch.full((B,), n, device="cuda", dtype=torch.int32),
        evict_lo=torch.full((B,), 4, device="cuda", dtype=torch.int32),
        evict_hi=torch.full((B,), 3 * n, device="cuda", dtype=torch.int32),
        mode=torch.ones(B, device="cuda", dtype=torch.int32),  # adsa everywhere: the full victim pass
        scale=1.0 / math.sqrt(D),
    )


def bytes_moved(case) -> int:
    B, H, D = case["q"].shape
    Hkv = case["k_cache"].shape[1]
    elt = case["k_cache"].element_size()  # 1 for e4m3, 2 for bf16; pos int32 and stat fp32 either way
    slots = int(case["n_slots"].sum()) * Hkv
    return slots * (2 * D * elt + 4 + 4) + 2 * B * H * D * case["q"].element_size()


def make_decode_step(case, victim, policy: str = "adsa"):
    """pool_decode_triton's arguments over `case`'s pool (shared, not copied: each call writes it): every
    row full (n_stored == budget == n_slots), so the write goes over `victim`, the previous pass's
    choice; every row of `policy` (line: the slot statistics, 1/|V| draws, serve as attention scores);
    candidates the read-only pass's [evict_lo, evict_hi]; the new token is newer
    than every stored position (< 4 n); k_new and v_new are strided views, like the model's."""
    q, kc = case["q"], case["k_cache"]
    B, H, D = q.shape
    Hkv = kc.shape[1]
    g = torch.Generator(device=q.device).manual_seed(B * D + 1)
    kv = torch.randn(B, 2, Hkv, D, device=q.device, dtype=q.dtype, generator=g)
    n = case["n_slots"]
    position = 4 * n.long()
    rows = DecodeRows(
        block_table=case["block_table"],
        n_stored=n.clone(),
        budget=n.clone(),
        prefix=case["evict_lo"],
        local=(position + 1 - case["evict_hi"]).int(),  # position + 1 - local == evict_hi
        mode=torch.full_like(case["mode"], policy_mode(policy)),
        position=position,
    )
    layer = LayerState(
        k=kc,
        v=case["v_cache"],
        pos=case["pos_cache"],
        stat=case["stat"],
        vsum=case["vsum"],
        lse=case["lse"],
        victim=victim.clone(),
        spill_k=torch.empty(B, Hkv, D, device=q.device, dtype=kc.dtype),
        spill_v=torch.empty(B, Hkv, D, device=q.device, dtype=kc.dtype),
        spill_pos=torch.empty(B, Hkv, device=q.device, dtype=torch.int32),
    )
    return q, kv[:, 0], kv[:, 1], layer, rows, case["scale"]


def write_bytes(step) -> int:
    """Bytes a decode step moves besides bytes_moved's: the new token's K/V read, its slot's K, V, pos
    and 1/|V| written, the overwritten slot's K, V, pos staged, S written back (per row and kv head)."""
    _, k_new, _, layer, _, _ = step
    B, Hkv, D = k_new.shape
    elt = layer.k.element_size()
    return B * Hkv * (2 * D * k_new.element_size() + (2 * D * elt + 8) + (2 * D * elt + 4) + 4 * D)


def beyond_rounding(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements of two stored tensors that differ: any difference, except that an e4m3 value may round
    a tie the other way (one step: 2**-3 relative, 2**-9 among subnormals)."""
    bad = raw(got) != raw(want)
    if got.dtype != FP8 or not bad.any():
        return int(bad.sum())
    g, w = raw(got)[bad].view(FP8).float(), raw(want)[bad].view(FP8).float()
    return int(((g - w).abs() > 2**-9 + 2**-3 * torch.minimum(g.abs(), w.abs())).sum())  # not neighbours


def check_write(step) -> tuple[float, int]:
    """One decode step of pool_decode_triton (it writes `step`'s state) against pool_decode_torch on
    a clone of that state: stored and staged values exact (e4m3: but for a tie rounded the other way),
    1/|V| and S as the GPU tests bound them, victims and out as check() bounds the read-only launch.
    Returns (relative error of out, victims that differ)."""
    q, k_new, v_new, layer, rows, scale = step
    ref_layer = LayerState(**{f.name: getattr(layer, f.name).clone() for f in dataclasses.fields(layer)})
    ref_out = pool_decode_torch(q, k_new, v_new, ref_layer, rows, scale)
    out = pool_decode_triton(q, k_new, v_new, layer, rows, scale)
    for name in ("k", "v", "pos", "spill_k", "spill_v", "spill_pos"):  # the whole pool: nothing else written
        got, want = getattr(layer, name), getattr(ref_layer, name)
        if bad := beyond_rounding(got, want):
            raise AssertionError(f"write path: {bad} of {got.numel()} {name} elements differ from pool_decode_torch")
    torch.testing.assert_close(layer.stat, ref_layer.stat, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.vsum, ref_layer.vsum, rtol=1e-4, atol=1e-3)
    differ = int((layer.victim != ref_layer.victim).sum())
    if differ > layer.victim.numel() // 1000:
        raise AssertionError(f"write path: {differ} of {layer.victim.numel()} victims differ from the oracle")
    err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
    if not err < 1e-2:
        raise AssertionError(f"write path: relative error {err}")
    return err, differ


def check(case, cfg, ref) -> float:
    """Relative error of out against the oracle; victims must agree except for rare near-ties."""
    out, victim = pool_attention_triton(**case, **cfg)
    differ = int((victim != ref[1]).sum())
    if differ > victim.numel() // 1000:
        raise AssertionError(f"{differ} of {victim.numel()} victims differ from the oracle with {cfg}")
    err = float((out.float() - ref[0].float()).norm() / ref[0].float().norm())
    if not err < 1e-2:
        raise AssertionError(f"relative error {err} with {cfg}")
    return err


def configs(G: int, D: int, programs: int, quick: bool, fp8: bool = False):
    """Launch configurations to sweep: (BLOCK_N, num_warps), and the pipelining depth of the default.
    The default's pair always comes first; fp8 adds larger blocks (a slot row is 64 bytes, not 128)."""
    base = default_config(G, D, 16, programs, fp8)
    pairs = [(base["block_n"], base["num_warps"])]
    if quick:
        pairs += [(32, 2)] + [(64, 2), (8, 1)] * fp8  # (8, 1): half the registers of 16/1, more programs per SM
    elif G > 1:  # GQA (tensor-core path): for information, no LlamaGen model uses it
        pairs += [(16, 2), (16, 4), (32, 4), (64, 4)]
    elif D <= 64:
        pairs += [(8, 1), (16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (64, 2), (64, 4), (128, 4)]
        if fp8:
            pairs += [(32, 1), (64, 1), (64, 2), (128, 2), (128, 4)]
    else:  # D = 100 pads to 128 columns: twice the registers per slot
        pairs += [(16, 1), (16, 2), (16, 4), (32, 2), (64, 4)]
    for block_n, num_warps in dict.fromkeys(pairs):  # in order, once each
        yield dict(block_n=block_n, num_warps=num_warps, num_stages=2)
    if not quick:
        yield from (dict(base, num_stages=s) for s in (1, 3) if s != base["num_stages"])


def bench_shape(B, n, H, Hkv, D, quick: bool, copy_gbs: float, kv_dtype=torch.bfloat16, write=False,
                policies=("adsa",)) -> dict:
    case = make_pool(B, n, H, Hkv, D, kv_dtype=kv_dtype)
    nbytes = bytes_moved(case)
    ref = pool_attention_torch(**case)
    results = []
    for cfg in configs(H // Hkv, D, Hkv * B, quick, fp8=kv_dtype == torch.float8_e4m3fn):
        err = check(case, cfg, ref)
        fn = lambda cfg=cfg: pool_attention_triton(**case, **cfg)
        ms = do_bench(fn, warmup=5, rep=40, return_mode="median")
        results.append(dict(cfg=cfg, ms=ms, gbs=nbytes / ms / 1e6, rel_err=err))
    err = check(case, {}, ref)  # the default launch, timed longer
    ms = do_bench(lambda: pool_attention_triton(**case), warmup=25, rep=200, return_mode="median")
    best = max(results, key=lambda r: r["gbs"])
    row = dict(
        B=B,
        n_slots=n,
        H=H,
        Hkv=Hkv,
        D=D,
        kv_dtype=str(kv_dtype).removeprefix("torch."),
        bytes=nbytes,
        default_cfg=default_config(H // Hkv, D, 16, Hkv * B, kv_dtype == torch.float8_e4m3fn),
        default_ms=ms,
        default_gbs=nbytes / ms / 1e6,
        default_rel_err=err,
        best=best,
        sweep=results,
    )
    line = (
        f"B={B:4d} n={n:3d} H/Hkv={H}/{Hkv} D={D:3d} {row['kv_dtype']}: default {row['default_gbs']:6.0f} GB/s "
        f"({row['default_gbs'] / copy_gbs:.0%}), best {best['gbs']:6.0f} GB/s {best['cfg']}"
    )
    if write:  # last: it writes the pool the read-only launches above read
        row["write_by_policy"] = {}
        for policy in policies:  # the same pool, one policy after the other (line also writes its scores)
            step = make_decode_step(case, ref[1], policy)  # the oracle's victims: what the previous pass chose
            w_err, w_differ = check_write(step)
            w_bytes = nbytes + write_bytes(step)
            w_ms = do_bench(lambda step=step: pool_decode_triton(*step), warmup=25, rep=200, return_mode="median")
            w = dict(bytes=w_bytes, ms=w_ms, gbs=w_bytes / w_ms / 1e6, rel_err=w_err, victims_differ=w_differ)
            row["write_by_policy"][policy] = w
            line += (
                f"\n    read-only {ms * 1e3:7.1f} us {row['default_gbs']:6.0f} GB/s"
                f" ({row['default_gbs'] / copy_gbs:.1%}) | {policy} write+attend {w_ms * 1e3:7.1f} us"
                f" {w['gbs']:6.0f} GB/s"
                f" ({w['gbs'] / copy_gbs:.1%}), {w_ms / ms:.2f}x the time"
            )
        row["write"] = row["write_by_policy"][policies[0]]
    print(line, flush=True)
    return row


def parse_shapes(text: str) -> list[tuple[int, int, int, int, int]]:
    """"512x144,1024x144" -> [(512, 144, 20, 20, 64), (1024, 144, 20, 20, 64)] (GPT-XL heads)."""
    try:
        pairs = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected BxN_SLOTS[,BxN_SLOTS...], got {text!r}")
    return [(B, n, 20, 20, 64) for B, n in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_pool_attention[_fp8].json")
    ap.add_argument("--quick", action="store_true", help="a few configurations only (the default launch among them)")
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16", help="how the pool stores K/V")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="BxN_SLOTS list for GPT-XL (H = Hkv = 20, D = 64), e.g. 512x144,1024x144,512x288; "
                         "default: B in {256, 512} x n in {144, 288, 576}, plus a D = 100 and a GQA shape")
    ap.add_argument("--write", action="store_true",
                    help="also time the engine's write + attention launch (pool_decode_triton, every row full) "
                         "beside the read-only one, for each of --policies; the report gets a _write suffix")
    ap.add_argument("--policies", default="adsa",
                    help="with --write: the policies whose write + attention launch is timed, e.g. adsa,line")
    args = ap.parse_args()
    kv_dtype = KV_DTYPES[args.kv_dtype]
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        query = ["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = "nvidia-smi not found"
    copy_gbs = copy_bandwidth()
    print(f"{card} | {stamp} | {smi}\ncopy bandwidth: {copy_gbs:.0f} GB/s (read + write)")

    # (B, n_slots, H, Hkv, D): GPT-XL as asked; GPT-3B (D = 100) and a GQA variant for reference
    shapes = args.shapes
    if shapes is None:
        shapes = [(B, n, 20, 20, 64) for B in (256, 512) for n in (144, 288, 576)]
        shapes += [(256, 576, 32, 32, 100), (256, 576, 20, 4, 64)]
    rows = []
    for shape in shapes:
        rows.append(bench_shape(*shape, args.quick, copy_gbs, kv_dtype, args.write, tuple(args.policies.split(","))))
        torch.cuda.empty_cache()
    copy_after = copy_bandwidth()
    report = dict(
        card=card,
        date=stamp,
        nvidia_smi=smi,
        copy_gbs=copy_gbs,
        copy_gbs_after=copy_after,
        kv_dtype=args.kv_dtype,
        write=args.write,
        rows=rows,
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
    os.makedirs(args.out, exist_ok=True)
    name = "bench_pool_attention" + ("" if args.kv_dtype == "bf16" else f"_{args.kv_dtype}")
    name += "_write.json" if args.write else ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(report, f, indent=1)

    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s before, {copy_after:.0f} after; {card}; {stamp}; K/V {args.kv_dtype}")
    head = ("B", "n", "H/Hkv", "D", "MB", "cfg", "us", "GB/s", "%copy")
    head += ("w us", "w GB/s", "w%copy") if args.write else ()  # w: write + attention (pool_decode_triton)
    print(" ".join(f"{h:>6}" for h in head), "| best in sweep: GB/s, config  (cfg = BLOCK_N/warps)")
    for r in rows:
        c = r["best"]["cfg"]
        best = f"{r['best']['gbs']:.0f}, BLOCK_N={c['block_n']} warps={c['num_warps']}"
        best += f" stages={c['num_stages']}"
        cells = (
            r["B"],
            r["n_slots"],
            f"{r['H']}/{r['Hkv']}",
            r["D"],
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['default_cfg']['block_n']}/{r['default_cfg']['num_warps']}",
            f"{r['default_ms'] * 1e3:.1f}",
        )
        cells += (f"{r['default_gbs']:.0f}", f"{r['default_gbs'] / copy_gbs:.1%}")
        if "write" in r:
            w = r["write"]
            cells += (f"{w['ms'] * 1e3:.1f}", f"{w['gbs']:.0f}", f"{w['gbs'] / copy_gbs:.1%}")
        print(" ".join(f"{c:>6}" for c in cells), "|", best)


if __name__ == "__main__":
    main()
