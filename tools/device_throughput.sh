#!/usr/bin/env bash
# Issue 19 on one H200: the public sampler from its own code, adsa-bench with the corrected reference row,
# the adsa 1/4 batch curve, and a step profile with each part beside its floor.
#
#   bash tools/device_throughput.sh                   # sections a d: one call, ~6.5 min
#   SECTIONS=b bash tools/device_throughput.sh        # a call of its own, ~8 min: the bench against the reference
#   B_PUBLIC=8,128 B_BENCH=8,128 SECTIONS="a b" ...    # other batches for sections a and b
#   SECTIONS=c bash tools/device_throughput.sh        # the adsa 1/4 fp8 curve at 512 and 1024, ~3 min
#   SECTIONS="g e" bash tools/device_throughput.sh    # the rest of the curve, small-batch profiles
#   SECTIONS=f bash tools/device_throughput.sh        # the reference's kernels, sampling compiled vs eager
#   SECTIONS=h bash tools/device_throughput.sh        # issue 19's best row beside its baseline, ~9 min
#   SMOKE=1 OUT=/tmp/tp bash tools/device_throughput.sh   # CPU, GPT-B 256, tiny batches: every command once
# From the repo root; LLAMAGEN=<LlamaGen checkout> (default .device-carry/llamagen).
#
# Time: compiles dominate and are the unknown. Every section is boxed by `timeout` and writes its rows as it
# goes, so a cut section keeps what it measured. Measured (run 16, H200): the public sampler took 66-69 s to
# compile per batch size, and the boxes below of the first version (185, 185, 55, 50 s) cut sections a, b
# and c; the boxes are now sized from those times. Default call: boxes 330 + 50 = 380 s, plus
# ~5 s of setup. Estimates per section:
#   (a) public sampler, batches 1, 64, 128, 8 (8 last: if the box cuts, the anchors 64 and 128 are in).
#       Four full-model compiles: its prefill and decode graphs, static at batch 1, then symbolic in the
#       batch from the second batch on (torch.compile's default, as sample_c2i.py): 66-69 s per batch
#       size measured. Runs ~35 s (gen 3.3 s at 64, 5.4 s at 128, each twice with the warm-up). ~310 s, box 330 s
#   (b) adsa-bench --compile, batches 1, 8, 64, 128: reference, dense bf16, adsa 1/4 bf16 and fp8, one wave
#       after the warm one. Reference: 2 step compiles ~90 s plus small sampling compiles; engine: block
#       compiles per bucket ~40 s; runs ~70 s. Measured: batches 1 and 8 of the reference and batch 1 of the
#       engine took the first 185 s.                                                   ~450 s, box 480 s
#   (c) adsa 1/4 fp8 at 512 and 1024, one wave (~12 and ~22 s) after bucket compiles (512 alone took the
#       first 55 s).                                                                   ~150 s, box 170 s
#   (d) tools/profile_engine.py, batch 512, adsa 1/4 fp8 (its bucket's compile, 150 + 15 steps, a VQ
#       decode of 16 images).                                                      ~40 s, box 50 s
# On request:
#   (g) the rest of the curve: fp8 at 256 and 2048 (~45 s at 2048), then bf16 at 256, 512, 1024, 2048.
#                                                                                   ~200 s, box 230 s
#   (e) profiles at batch 1 and 8 of the served default path (adsa 1/4, fp8 K/V, compiled), matmuls in bf16
#       and in fp8 (runs 19-20: ~30-40 s each).                                       ~170 s, box 4 x 50 s
#   (f) tools/reference_ab.py --profile at batches 1 and 64: one step compile per batch, its top kernels
#       (run 19: 64 alone took 213 s while the reference was slow).                  ~240 s, box 300 s
#   (h) issue 19's best row with the corrected baseline in the same call: the public sampler at 128 (its best
#       batch: 256 does not fit its memory), then adsa 1/4 at 1024 with fp8 K/V and fp8 matmuls, as main builds
#       it and with the VQ GroupNorms from per-channel statistics (tools/bench_engine_channel_stats.py; the
#       second engine process finds the step's compile in Inductor's cache).     ~480 s, box 150 + 2 x 190 s
# Files in $OUT: env.txt and log.txt, then a: public.jsonl, b: bench_b.json, c: curve_fp8.json,
# d: profile.txt, g: curve_fp8_more.json and curve_bf16.json, e: profile_b{1,8}_{auto,fp8}.txt,
# f: reference_ab.jsonl, h: public_best.jsonl, best_main.json and
# best_channel_stats.json. That is 6 files for the default call and at most 6 for the others (e: 4).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # keeps carried wheels (/tmp/site)
OUT=${OUT:?set by the device machine}
LLAMAGEN=${LLAMAGEN:-.device-carry/llamagen}
SECTIONS=${SECTIONS:-a d}
MODEL=GPT-XL SIZE=384 B_PUBLIC=${B_PUBLIC:-1,64,128,8} B_BENCH=${B_BENCH:-1,8,64,128} B_FP8=512,1024 B_FP8_MORE=256,2048
B_BF16=256,512,1024,2048 B_BEST=1024 B_PUB_BEST=128 B_PROF=512 WARM=150 VQ_IMAGES=16 B_SMALL="1 8" B_AB=1,64 CPU="" PUB_CPU="" BOX=1
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands on the CPU with a small model and batches
  MODEL=GPT-B SIZE=256 B_PUBLIC=1,2 B_BENCH=1,2 B_FP8=2 B_FP8_MORE=4 B_BF16=2 B_BEST=2 B_PUB_BEST=2 B_PROF=2 WARM=70 VQ_IMAGES=1 B_SMALL=1 B_AB=2
  CPU="--device cpu" PUB_CPU="--device cpu --no-compile" BOX=8
fi
LOG=$OUT/log.txt
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s" | tee -a "$LOG"; }
wants() { case " $SECTIONS " in *" $1 "*) return 0;; esac; return 1; }
# adsa-bench rows of adsa 1/4 alone: the batch curve. BENCH: the bench to run (adsa-bench, or a wrapper that
# takes its arguments); the arguments after the fourth go to it as they are
curve() {  # box_s kv_dtype batches out_name [bench args...]
  local box=$1 kv=$2 batches=$3 name=$4
  shift 4
  rm -rf /tmp/tp_$name  # a warm machine's earlier result must not pass for this one's
  timeout $((box * BOX)) python3 ${BENCH:--m adsa_core.eval.bench} --presets $MODEL --image-sizes $SIZE --batches= \
      $CPU --sparse-batches $batches --no-reference --policies adsa --budgets 0.25 --waves 1 --compile \
      --kv-cache-dtypes $kv --out /tmp/tp_$name "$@" >> "$LOG" 2>&1 || echo "$name: rc=$?" >> "$LOG"
  cp /tmp/tp_$name/bench.json "$OUT/$name.json" 2>> "$LOG"
}

{ date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  cat "$LLAMAGEN/COMMIT" 2>/dev/null; } > "$OUT/env.txt" 2>&1

if wants a; then
  stamp "a: public sampler"
  timeout $((330 * BOX)) python3 tools/public_sampler_bench.py --llamagen "$LLAMAGEN" --gpt-model $MODEL \
      --image-size $SIZE --batches $B_PUBLIC $PUB_CPU --out "$OUT/public.jsonl" >> "$LOG" 2>&1 \
      || echo "a: rc=$?" >> "$LOG"
fi
if wants b; then
  stamp "b: adsa-bench, reference + engine"
  timeout $((480 * BOX)) python3 -m adsa_core.eval.bench --presets $MODEL --image-sizes $SIZE --batches $B_BENCH \
      $CPU --policies adsa --budgets 0.25 --waves 1 --compile --kv-cache-dtypes auto,fp8 \
      --dense-kv-cache-dtypes auto --out /tmp/tp_b >> "$LOG" 2>&1 || echo "b: rc=$?" >> "$LOG"
  cp /tmp/tp_b/bench.json "$OUT/bench_b.json" 2>> "$LOG"
fi
if wants c; then
  stamp "c: adsa 1/4 fp8 at $B_FP8"
  curve 170 fp8 $B_FP8 curve_fp8
fi
if wants d; then
  stamp "d: step profile, batch $B_PROF, adsa 1/4, fp8 K/V"
  timeout $((50 * BOX)) python3 tools/profile_engine.py --preset $MODEL --image-size $SIZE --batch $B_PROF $CPU \
      --policy adsa --budget 0.25 --compile --kv-cache-dtype fp8 --warm-steps $WARM --steps 10 --vq-images $VQ_IMAGES \
      > "$OUT/profile.txt" 2>> "$LOG" || echo "d: rc=$?" >> "$LOG"
fi
if wants g; then
  stamp "g: the rest of the curve"
  curve 90 fp8 $B_FP8_MORE curve_fp8_more
  curve 140 auto $B_BF16 curve_bf16
fi
if wants e; then
  for b in $B_SMALL; do
    for mm in auto fp8; do
      stamp "e: step profile, batch $b, adsa 1/4, fp8 K/V, $mm matmuls"
      timeout $((50 * BOX)) python3 tools/profile_engine.py --preset $MODEL --image-size $SIZE --batch $b $CPU \
          --policy adsa --budget 0.25 --compile --kv-cache-dtype fp8 --matmul-dtype $mm --warm-steps 150 --steps 50 \
          --vq-images 1 > "$OUT/profile_b${b}_$mm.txt" 2>> "$LOG" || echo "e $b $mm: rc=$?" >> "$LOG"
    done
  done
fi
if wants f; then
  stamp "f: reference A/B"
  timeout $((300 * BOX)) python3 tools/reference_ab.py --preset $MODEL --image-size $SIZE --batches $B_AB $CPU --profile \
      > "$OUT/reference_ab.jsonl" 2>> "$LOG" || echo "f: rc=$?" >> "$LOG"
fi
if wants h; then
  stamp "h: public sampler at $B_PUB_BEST"
  timeout $((150 * BOX)) python3 tools/public_sampler_bench.py --llamagen "$LLAMAGEN" --gpt-model $MODEL \
      --image-size $SIZE --batches $B_PUB_BEST $PUB_CPU --out "$OUT/public_best.jsonl" >> "$LOG" 2>&1 \
      || echo "h public: rc=$?" >> "$LOG"
  stamp "h: adsa 1/4 fp8 K/V, fp8 matmuls at $B_BEST, main"
  curve 190 fp8 $B_BEST best_main --matmul-dtypes fp8
  stamp "h: the same, VQ GroupNorms from per-channel statistics"
  BENCH=tools/bench_engine_channel_stats.py curve 190 fp8 $B_BEST best_channel_stats --matmul-dtypes fp8
fi
stamp "done"
