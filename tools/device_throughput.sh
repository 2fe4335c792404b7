#!/usr/bin/env bash
# Issue 19 in one device call (one H200): the public sampler from its own code, then adsa-bench with the
# corrected reference row, the adsa 1/4 batch curve and a step profile against each part's floor.
#
#   bash tools/device_throughput.sh          # from the repo root; LLAMAGEN=<checkout> (default .device-carry/llamagen)
#   SECTIONS="c d" bash tools/device_throughput.sh   # a subset, e.g. for a second call
#   SMOKE=1 OUT=/tmp/tp bash tools/device_throughput.sh  # CPU, GPT-B 256, tiny batches: every command once
#
# Estimated wall time on one H200: ~7.5-8 min, each section boxed by `timeout` so the whole stays under
# 8 min (sum of the boxes 465 s + ~10 s of setup). Estimates (compile times are the unknown; every section
# writes its rows as it goes, so a cut section still leaves what it measured):
#   (a) public sampler, batches 1, 8, 64, 128: 2 full-model compiles (static at batch 1, symbolic batch
#       after, torch.compile's default) ~50 s each, runs ~35 s (gen 3.3 s at 64, 5.4 s at 128, each twice
#       with the warm-up)                                                   box 130 s
#   (b) adsa-bench --compile, batches 1, 8, 64, 128: reference, dense bf16, adsa 1/4 bf16 and fp8, 1 wave
#       after the warm one: reference compiles ~100 s, engine block compiles ~40 s, runs ~90 s   box 180 s
#   (c) adsa 1/4 batch curve, fp8 at 256, 512, 1024, 2048 then bf16 at 256, 512, 1024 (1 wave): ~7, 11,
#       22, 43 s per fp8 row; bf16 rows get what the box leaves                 box 110 s
#   (d) tools/profile_engine.py at batch 512, adsa 1/4 fp8, with floors        box 45 s
# Files in $OUT (7): env.txt, public.jsonl, bench_b.json, curve_fp8.json, curve_bf16.json, profile.txt, log.txt
# Only when asked (SECTIONS="e f", ~5 min, 4 files): e = profile_b1.txt, profile_b8.txt (a lone request's step,
# dense, compiled); f = reference_ab.jsonl (tools/reference_ab.py: the old reference's costs one at a time).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set by the device machine}
LLAMAGEN=${LLAMAGEN:-.device-carry/llamagen}
SECTIONS=${SECTIONS:-a b c d}
MODEL=GPT-XL SIZE=384 B_PUBLIC=1,8,64,128 B_BENCH=1,8,64,128 B_FP8=256,512,1024,2048 B_BF16=256,512,1024
B_PROF=512 WARM=160 B_AB=1,64 CPU="" PUB_CPU="" BOX=1
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands on the CPU with a small model and batches
  MODEL=GPT-B SIZE=256 B_PUBLIC=1,2 B_BENCH=1,2 B_FP8=2,4 B_BF16=2 B_PROF=2 WARM=70 B_AB=2 CPU="--device cpu"
  PUB_CPU="--device cpu --no-compile" BOX=8
fi
LOG=$OUT/log.txt
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s" | tee -a "$LOG"; }

{ date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  cat "$LLAMAGEN/COMMIT" 2>/dev/null; } > "$OUT/env.txt" 2>&1

case " $SECTIONS " in *" a "*)
  stamp "a: public sampler"
  timeout $((130 * BOX)) python3 tools/public_sampler_bench.py --llamagen "$LLAMAGEN" --gpt-model $MODEL \
      --image-size $SIZE --batches $B_PUBLIC $PUB_CPU --out "$OUT/public.jsonl" >> "$LOG" 2>&1 || echo "a: rc=$?" >> "$LOG";;
esac

case " $SECTIONS " in *" b "*)
  stamp "b: adsa-bench, reference + engine, small and mid batches"
  timeout $((180 * BOX)) python3 -m adsa_core.eval.bench --presets $MODEL --image-sizes $SIZE --batches $B_BENCH $CPU \
      --policies adsa --budgets 0.25 --waves 1 --compile --kv-cache-dtypes auto,fp8 --dense-kv-cache-dtypes auto \
      --out /tmp/tp_b >> "$LOG" 2>&1 || echo "b: rc=$?" >> "$LOG"
  cp /tmp/tp_b/bench.json "$OUT/bench_b.json" 2>> "$LOG";;
esac

case " $SECTIONS " in *" c "*)
  stamp "c: adsa 1/4 batch curve, fp8 then bf16"
  timeout $((75 * BOX)) python3 -m adsa_core.eval.bench --presets $MODEL --image-sizes $SIZE --batches= $CPU \
      --sparse-batches $B_FP8 --no-reference --policies adsa --budgets 0.25 --waves 1 --compile \
      --kv-cache-dtypes fp8 --out /tmp/tp_c8 >> "$LOG" 2>&1 || echo "c fp8: rc=$?" >> "$LOG"
  cp /tmp/tp_c8/bench.json "$OUT/curve_fp8.json" 2>> "$LOG"
  timeout $((35 * BOX)) python3 -m adsa_core.eval.bench --presets $MODEL --image-sizes $SIZE --batches= $CPU \
      --sparse-batches $B_BF16 --no-reference --policies adsa --budgets 0.25 --waves 1 --compile \
      --kv-cache-dtypes auto --out /tmp/tp_c16 >> "$LOG" 2>&1 || echo "c bf16: rc=$?" >> "$LOG"
  cp /tmp/tp_c16/bench.json "$OUT/curve_bf16.json" 2>> "$LOG";;
esac

case " $SECTIONS " in *" d "*)
  stamp "d: step profile, batch 512, adsa 1/4, fp8 K/V"
  timeout $((45 * BOX)) python3 tools/profile_engine.py --preset $MODEL --image-size $SIZE --batch $B_PROF $CPU \
      --policy adsa --budget 0.25 --compile --kv-cache-dtype fp8 --warm-steps $WARM --steps 10 > "$OUT/profile.txt" 2>> "$LOG" \
      || echo "d: rc=$?" >> "$LOG";;
esac
case " $SECTIONS " in *" e "*)  # not in the default set: a lone request's step, for a later call (~40 s)
  stamp "e: step profile, batch 1 and 8, dense bf16"
  for b in 1 8; do
    timeout $((45 * BOX)) python3 tools/profile_engine.py --preset $MODEL --image-size $SIZE --batch $b $CPU \
        --policy dense --compile --warm-steps 100 --steps 50 > "$OUT/profile_b$b.txt" 2>> "$LOG" \
        || echo "e $b: rc=$?" >> "$LOG"
  done;;
esac
case " $SECTIONS " in *" f "*)  # not in the default set: the reference's old costs one by one (~4 min: 4 compiles)
  stamp "f: reference A/B"
  timeout $((300 * BOX)) python3 tools/reference_ab.py --preset $MODEL --image-size $SIZE --batches $B_AB $CPU \
      > "$OUT/reference_ab.jsonl" 2>> "$LOG" || echo "f: rc=$?" >> "$LOG";;
esac
stamp "done"
