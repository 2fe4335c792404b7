#!/usr/bin/env bash
# Load test of the real server on one machine with two GPUs, in one command, results under $OUT:
#
#   1. replica A (GPU 0) and replica B (GPU 1) start on 127.0.0.1 (a GPT preset with random weights
#      and a random VQ, CUDA graphs on, no torch.compile); wait for /readyz (time-boxed);
#   2. on A alone: `python -m loadtest` with a closed-loop capacity probe (2 x max batch clients),
#      then Poisson stages at 25/50/75/90/110/130 % of what the probe sustained, for policy dense,
#      then the same for adsa at budget 1/4 (per request: the workload's policy / kv_budget);
#      a compare of the two;
#   3. scale-out: least_conn balancer (deploy/nginx/nginx.conf via tools/lb.py; the carried nginx in
#      .nginx/, else the system's, else tools/lb.py serve) in front of A alone and in front of A + B;
#      closed loop at 2 x max batch clients per replica through each; $OUT/scaleout.json has both
#      throughputs and their ratio (target >= 1.8);
#   4. $OUT/RESULTS.md: the tables for docs/PERFORMANCE.md (tools/loadtest_summary.py table).
#
# $OUT at the end (a device call returns at most 8 files): RESULTS.md, scaleout.json, env.json,
# run.log, compare-dense-adsa.md and details.tar.gz (every loadtest report, server and balancer
# log, nginx configs: the tree $OUT/details, kept unpacked with ADSA_LT_KEEP_TREE=1).
#
# Every wait is time-boxed, the whole run keeps to ADSA_LT_BUDGET_S (default 500 s after start-up
# of this script), children are stopped on exit, server and balancer logs go to details/logs.
# B starts together with A so that its warm-up overlaps A's; it stays idle (own GPU) until step 3.
#
#   OUT=/tmp/lt tools/device_loadtest.sh                       # device: 2 GPUs
#   ADSA_LT_DEVICE=cpu OUT=/tmp/lt tools/device_loadtest.sh    # CPU smoke run, tiny model, ~2.5 min
#   tools/device_loadtest.sh --prepare                         # here: fetch .whl/ and .nginx/ to carry
#
# Knobs (environment; GPU defaults, CPU defaults in brackets): ADSA_LT_GPT_MODEL GPT-L,
# ADSA_LT_IMAGE_SIZE 256, ADSA_LT_MAX_BATCH 64 [4], ADSA_LT_CONCURRENCY 2 x max batch,
# ADSA_LT_BUDGET 0.25 (adsa kv_budget), ADSA_LT_CFG 4, ADSA_LT_TOP_K 2000 [server default],
# ADSA_LT_STAGE_S 10 [3], ADSA_LT_PROBE_S 12 [3], ADSA_LT_WARMUP_S 8 [2], ADSA_LT_SCALE_S 16 [4],
# ADSA_LT_RAMP_S 2 [0.5] (closed-loop clients start spread over it),
# ADSA_LT_FRACTIONS 0.25,0.5,0.75,0.9,1.1,1.3 [0.5,0.9,1.3], ADSA_LT_SLO_MS 20000,
# ADSA_LT_READY_S 300 [120], ADSA_LT_BUDGET_S 500 [170], ADSA_LT_LB auto|nginx|python,
# ADSA_LT_WAIT_PID (scale-out waits for this process: other work on B's GPU),
# ADSA_LT_NGINX_TRY "carried carried-glibc system" (nginx builds tried in order),
# ADSA_LT_SCALE_POLICY better|dense|adsa, ADSA_LT_MODEL preset|tiny|demo, ADSA_LT_GPUS "0 1",
# ADSA_LT_PORT_BASE 8100, ADSA_LT_COMMIT (recorded in env.json), PYTHON (default python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

# ---- --prepare: what the device call carries (run here, with the package registries) --------------
WHEELS=(
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1
    uvicorn==0.54.0 annotated-types==0.7.0 typing-inspection==0.4.2 python-dotenv==1.2.2
    typing-extensions==4.16.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 nvidia-ml-py==13.615.71
    pyzmq==27.3.0 python-json-logger==4.2.0
)
NGINX_DEBS=(nginx libcrypt1 libpcre2-8-0 libssl3 zlib1g libc6)

prepare() {
    cd "$REPO" || exit 1
    mkdir -p .git/info && touch .git/info/exclude
    for d in /.whl/ /.nginx/; do grep -qxF "$d" .git/info/exclude || echo "$d" >>.git/info/exclude; done
    rm -rf .whl && mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
    local tmp
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download "${NGINX_DEBS[@]}") || exit 1
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x"; done
    rm -rf .nginx && mkdir -p .nginx/sbin .nginx/lib .nginx/glibc
    cp "$tmp/x/usr/sbin/nginx" .nginx/sbin/
    for lib in libcrypt.so.1 libpcre2-8.so.0 libssl.so.3 libcrypto.so.3 libz.so.1; do
        cp -L "$(find "$tmp/x" -name "$lib" | head -1)" .nginx/lib/
    done
    cp -L "$tmp/x/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$tmp/x/lib/x86_64-linux-gnu/libc.so.6" .nginx/glibc/
    (cd "$tmp" && ls ./*.deb | sed 's|^\./||') >.nginx/DEBS
    rm -rf "$tmp"
    LD_LIBRARY_PATH=.nginx/lib .nginx/sbin/nginx -v
    .nginx/glibc/ld-linux-x86-64.so.2 --library-path .nginx/lib:.nginx/glibc .nginx/sbin/nginx -v
    tar -czf "$tmp.tar.gz" -C .nginx . && rm -rf .nginx/sbin .nginx/lib .nginx/glibc && mv "$tmp.tar.gz" .nginx/nginx-root.tar.gz
    du -sh .whl .nginx
}
if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit $?
fi

# ---- settings --------------------------------------------------------------------------------------
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

DEV="${ADSA_LT_DEVICE:-cuda}"
TINY_VQ_CKPT="$REPO/tests/data/llamagen/vq.pt"
if [[ "$DEV" == cpu ]]; then
    if [[ -f "$TINY_VQ_CKPT" ]]; then d_model=tiny; else d_model=demo; fi
    d_batch=4 d_stage=3 d_probe=3 d_warm=2 d_scale=4 d_ramp=0.5 d_fracs=0.5,0.9,1.3 d_ready=120 d_budget=170
    d_topk=""
else
    d_model=preset d_batch=64 d_stage=10 d_probe=12 d_warm=8 d_scale=16 d_ramp=2 d_fracs=0.25,0.5,0.75,0.9,1.1,1.3
    d_ready=300 d_budget=500 d_topk=2000
fi
MODEL="${ADSA_LT_MODEL:-$d_model}"
GPT_MODEL="${ADSA_LT_GPT_MODEL:-GPT-L}"
IMAGE_SIZE="${ADSA_LT_IMAGE_SIZE:-256}"
MAX_BATCH="${ADSA_LT_MAX_BATCH:-$d_batch}"
CONC="${ADSA_LT_CONCURRENCY:-$((2 * MAX_BATCH))}"
KV_BUDGET="${ADSA_LT_BUDGET:-0.25}"
CFG="${ADSA_LT_CFG:-4}"
TOP_K="${ADSA_LT_TOP_K-$d_topk}"
STAGE_S="${ADSA_LT_STAGE_S:-$d_stage}"
PROBE_S="${ADSA_LT_PROBE_S:-$d_probe}"
WARMUP_S="${ADSA_LT_WARMUP_S:-$d_warm}"
SCALE_S="${ADSA_LT_SCALE_S:-$d_scale}"
RAMP_S="${ADSA_LT_RAMP_S:-$d_ramp}"
FRACTIONS="${ADSA_LT_FRACTIONS:-$d_fracs}"
SLO_MS="${ADSA_LT_SLO_MS:-20000}"
READY_S="${ADSA_LT_READY_S:-$d_ready}"
BUDGET_S="${ADSA_LT_BUDGET_S:-$d_budget}"
LB_WANT="${ADSA_LT_LB:-auto}"
SCALE_POLICY="${ADSA_LT_SCALE_POLICY:-better}"
read -r -a GPUS <<<"${ADSA_LT_GPUS:-0 1}"
PORT_BASE="${ADSA_LT_PORT_BASE:-8100}"
PORT_A=$((PORT_BASE + 1)) PORT_B=$((PORT_BASE + 2)) PORT_LB1=$((PORT_BASE + 10)) PORT_LB2=$((PORT_BASE + 11))
URL_A="http://127.0.0.1:$PORT_A" URL_B="http://127.0.0.1:$PORT_B"
URL_LB1="http://127.0.0.1:$PORT_LB1" URL_LB2="http://127.0.0.1:$PORT_LB2"
NF=$(($(tr -cd ',' <<<"$FRACTIONS" | wc -c) + 1))

OUT="${OUT:-$REPO/out/device-lt-$(date -u +%Y%m%d-%H%M%S)}"
D="$OUT/details" # everything; packed into $OUT/details.tar.gz at exit (the device returns at most 8 files)
mkdir -p "$D/logs" "$D/lt" || exit 1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/adsa-lt.XXXXXX")"
DEADLINE=$((SECONDS + BUDGET_S))
FAILED=()
PIDS=()

log() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*" | tee -a "$OUT/run.log" >&2; }
left() { echo $((DEADLINE - SECONDS)); }
fail() {
    FAILED+=("$1")
    log "FAILED: $1"
}

pack() { # the few files a device call returns at the top of $OUT, the rest in one archive
    local f
    for f in RESULTS.md scaleout.json env.json; do [[ -f "$D/$f" ]] && cp "$D/$f" "$OUT/$f"; done
    [[ -f "$D/lt/compare/compare.md" ]] && cp "$D/lt/compare/compare.md" "$OUT/compare-dense-adsa.md"
    cp "$OUT/run.log" "$D/run.log" 2>/dev/null
    if [[ "${ADSA_LT_KEEP_TREE:-0}" != 1 ]]; then
        tar -czf "$OUT/details.tar.gz" -C "$OUT" details && rm -rf "$D"
    fi
}

cleanup() {
    local pid alive i
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for i in $(seq 40); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.25
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    for f in "$WORK"/lb*/error.log; do [[ -f "$f" ]] && cp "$f" "$D/logs/nginx-$(basename "$(dirname "$f")").log"; done
    rm -rf "$WORK"
    pack
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

SETTINGS_JSON=$("$PY" -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' \
    device="$DEV" model="$([[ $MODEL == preset ]] && echo "$GPT_MODEL" || echo "$MODEL")" \
    image_size="$([[ $MODEL == preset ]] && echo "$IMAGE_SIZE" || echo "")" max_batch="$MAX_BATCH" \
    weights="$(case $MODEL in preset) echo "random GPT and VQ weights" ;; tiny) echo "the test suite's tiny random GPT, 32 px" ;; *) echo "the embedded demo model" ;; esac)" \
    concurrency="$CONC" budget="$KV_BUDGET" cfg_scale="$CFG" top_k="$TOP_K" stage_s="$STAGE_S" \
    probe_s="$PROBE_S" warmup_s="$WARMUP_S" scale_s="$SCALE_S" ramp_s="$RAMP_S" fractions="$FRACTIONS" slo_ms="$SLO_MS")
log "adsa-serve device load test -> $OUT ($SETTINGS_JSON)"

if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, prometheus_client, httpx, matplotlib, torch" \
    2>"$D/logs/imports.log"; then
    log "missing Python packages (see logs/imports.log):"
    tail -3 "$D/logs/imports.log" >&2
    exit 2
fi

# ---- the model each replica serves -------------------------------------------------------------
SERVER_ENV=(
    ADSA_HOST=127.0.0.1 ADSA_DEVICE="$DEV" ADSA_MAX_BATCH_SIZE="$MAX_BATCH" ADSA_KV_POLICY=adsa
    ADSA_KV_BUDGET="$KV_BUDGET" ADSA_CUDA_GRAPHS=true ADSA_REQUEST_TIMEOUT_S=120 ADSA_DRAIN_TIMEOUT_S=5
    ADSA_LOG_LEVEL=info
)
case "$MODEL" in
preset)
    log "random VQ checkpoint for $GPT_MODEL at $IMAGE_SIZE px"
    if ! timeout -k 5 120 "$PY" - "$WORK/vq_random.pt" <<'EOF' >>"$D/logs/setup.log" 2>&1; then
import sys

import torch

from adsa_core.config import VQConfig
from adsa_core.model.vq import VQModel

torch.manual_seed(0)
torch.save(VQModel(VQConfig()).state_dict(), sys.argv[1])
EOF
        fail "random VQ checkpoint (logs/setup.log)"
        exit 1
    fi
    SERVER_ENV+=(ADSA_GPT_MODEL="$GPT_MODEL" ADSA_IMAGE_SIZE="$IMAGE_SIZE" ADSA_VQ_CKPT="$WORK/vq_random.pt")
    ;;
tiny) # the test suite's tiny model (tests/server/server_live.py): 2 layers, 8x8 tokens, 32 px
    SERVER_ENV+=(
        'ADSA_GPT_CONFIG={"dim":64,"n_layer":2,"n_head":4,"vocab_size":64,"block_size":64,"num_classes":10,"model_type":"c2i"}'
        'ADSA_VQ_CONFIG={"codebook_size":64,"codebook_embed_dim":8,"encoder_ch_mult":[1,1,2],"decoder_ch_mult":[1,1,2],"z_channels":32,"ch":32}'
        ADSA_VQ_CKPT="$TINY_VQ_CKPT" OMP_NUM_THREADS=1
    )
    ;;
demo) SERVER_ENV+=(OMP_NUM_THREADS=1) ;;
*)
    log "unknown ADSA_LT_MODEL=$MODEL (preset, tiny or demo)"
    exit 2
    ;;
esac

start_server() { # NAME GPU PORT
    (
        for v in $(compgen -e | grep '^ADSA_'); do unset "$v"; done
        exec env "${SERVER_ENV[@]}" CUDA_VISIBLE_DEVICES="$2" ADSA_PORT="$3" "$PY" -m server
    ) >"$D/logs/server-$1.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$1=$!"
    log "replica $1: pid $! on port $3, CUDA_VISIBLE_DEVICES=$2"
}

ready() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" 2>/dev/null; }

wait_ready() { # NAME URL PID TIMEOUT_S
    local until=$((SECONDS + $4))
    while ((SECONDS < until)); do
        if ! kill -0 "$3" 2>/dev/null; then
            log "replica $1 exited before it was ready (logs/server-$1.log):"
            tail -5 "$D/logs/server-$1.log" >&2
            return 1
        fi
        if ready "$2/readyz"; then
            log "replica $1 ready"
            return 0
        fi
        sleep 1
    done
    log "replica $1 not ready after $4 s (logs/server-$1.log)"
    return 1
}

lt() { # NAME TIMEOUT_S ARGS... : one loadtest run, its stderr in logs/lt-NAME.log
    local name=$1 limit=$2
    shift 2
    timeout -k 5 "$limit" "$PY" -m loadtest "$@" >>"$D/logs/lt-$name.log" 2>&1
    local rc=$?
    tail -1 "$D/logs/lt-$name.log" | sed "s|^|  [$name] |" >&2
    return $rc
}

COMMON=(--requests 5000 --timeout 60 --drain-timeout 20 --slo-ms "$SLO_MS" --cfg-scale "$CFG" --metrics-interval 1
    --ramp "$RAMP_S")
[[ -n "$TOP_K" ]] && COMMON+=(--top-k "$TOP_K")
policy_args() { # POLICY
    if [[ "$1" == dense ]]; then echo "--policies dense"; else echo "--policies $1 --budgets $KV_BUDGET"; fi
}

# ---- 1. replicas ---------------------------------------------------------------------------------
start_server A "${GPUS[0]}" "$PORT_A"
start_server B "${GPUS[1]:-${GPUS[0]}}" "$PORT_B"
(ADSA_LT_SETTINGS_JSON="$SETTINGS_JSON" "$PY" "$REPO/tools/loadtest_summary.py" env --out "$D/env.json" \
    >>"$D/logs/setup.log" 2>&1 &)
wait_ready A "$URL_A" "$PID_A" "$READY_S" || {
    fail "replica A never got ready"
    exit 1
}
B_OK=1
wait_ready B "$URL_B" "$PID_B" "$((READY_S / 2))" || {
    B_OK=0
    fail "replica B never got ready: no scale-out"
}

# ---- 2. one replica: dense vs adsa ---------------------------------------------------------------
log "warm-up of A: $CONC clients for $WARMUP_S s (CUDA graphs of every batch bucket, both policies)"
lt warmup-A $((WARMUP_S + 60)) --url "$URL_A" --concurrency "$CONC" --duration "$WARMUP_S" --max-duration \
    $((WARMUP_S + 40)) --policies dense,adsa --budgets "$KV_BUDGET" "${COMMON[@]}" --no-metrics \
    --out "$D/lt/warmup-A" || log "warm-up run failed (continuing)"

SWEEP_MAX=$((PROBE_S + NF * (STAGE_S + STAGE_S / 2 + 3) + 15))
SCALE_NEED=$((WARMUP_S + 2 * SCALE_S + 40))
for policy in dense adsa; do
    budget=$(($(left) - 10 - SCALE_NEED))
    [[ $policy == dense ]] && budget=$((budget - SWEEP_MAX)) # leave room for adsa too
    ((budget > SWEEP_MAX)) && budget=$SWEEP_MAX
    if ((budget < PROBE_S + 2 * STAGE_S)); then
        fail "sweep $policy skipped: $(left) s left"
        continue
    fi
    log "sweep $policy on A: probe $CONC clients x $PROBE_S s, then rates $FRACTIONS x capacity, $STAGE_S s each (max $budget s)"
    # shellcheck disable=SC2046
    lt "$policy" $((budget + 30)) --url "$URL_A" --probe-concurrency "$CONC" --probe-duration "$PROBE_S" \
        --relative-rates "$FRACTIONS" --duration "$STAGE_S" --max-duration "$budget" $(policy_args "$policy") \
        "${COMMON[@]}" --out "$D/lt/$policy" || fail "sweep $policy (logs/lt-$policy.log)"
done
if [[ -f "$D/lt/dense/summary.json" && -f "$D/lt/adsa/summary.json" ]]; then
    "$PY" -m loadtest compare "$D/lt/dense" "$D/lt/adsa" --labels "dense,adsa-$KV_BUDGET" \
        --out "$D/lt/compare" >>"$D/logs/lt-compare.log" 2>&1 || fail "compare"
fi

# ---- 3. scale-out: one replica vs two behind the balancer -----------------------------------------
NGINX_CMD=()
NGINX_USER=()
[[ $(id -u) == 0 ]] && NGINX_USER=(--user "root root") # workers as root: no need for a nobody/nogroup entry
find_nginx() { # sets NGINX_CMD to the first nginx that passes `nginx -t` on a generated config
    local p="$WORK/lbtest" cand
    "$PY" "$REPO/tools/lb.py" nginx-conf --listen "$PORT_LB1" --upstream "127.0.0.1:$PORT_A" --prefix "$p" \
        --out "$p/nginx.conf" "${NGINX_USER[@]}" >/dev/null 2>>"$D/logs/lb.log" || return 1
    local N="$REPO/.nginx"
    if [[ -f "$N/nginx-root.tar.gz" ]]; then # as carried: unpack into a private prefix
        mkdir -p "$WORK/nginx-root" && tar -xzf "$N/nginx-root.tar.gz" -C "$WORK/nginx-root" && N="$WORK/nginx-root"
    fi
    for cand in ${ADSA_LT_NGINX_TRY:-carried carried-glibc system}; do
        case $cand in
        carried) NGINX_CMD=(env "LD_LIBRARY_PATH=$N/lib" "$N/sbin/nginx") ;;
        carried-glibc) NGINX_CMD=("$N/glibc/ld-linux-x86-64.so.2" --library-path "$N/lib:$N/glibc" "$N/sbin/nginx") ;;
        system) NGINX_CMD=("$(command -v nginx || echo /usr/sbin/nginx)") ;;
        esac
        if "${NGINX_CMD[@]}" -t -p "$p" -c "$p/nginx.conf" -e "$p/error.log" >>"$D/logs/lb.log" 2>&1; then
            log "nginx: $cand ($("${NGINX_CMD[@]}" -v 2>&1 | tr -d '\n'))"
            return 0
        fi
        echo "nginx candidate $cand failed" >>"$D/logs/lb.log"
    done
    NGINX_CMD=()
    return 1
}

LB_KIND=""
start_lb() { # NAME PORT UPSTREAM_PORT...
    local name=$1 port=$2 p="$WORK/$1" ups=()
    shift 2
    for u in "$@"; do ups+=(--upstream "127.0.0.1:$u"); done
    if [[ "$LB_KIND" == nginx ]]; then
        "$PY" "$REPO/tools/lb.py" nginx-conf --listen "$port" "${ups[@]}" --prefix "$p" --out "$p/nginx.conf" \
            "${NGINX_USER[@]}" 2>>"$D/logs/lb.log" || return 1
        cp "$p/nginx.conf" "$D/logs/nginx-$name.conf"
        "${NGINX_CMD[@]}" -p "$p" -c "$p/nginx.conf" -e "$p/error.log" >>"$D/logs/lb-$name.log" 2>&1 &
    else
        "$PY" "$REPO/tools/lb.py" serve --listen "$port" "${ups[@]}" >>"$D/logs/lb-$name.log" 2>&1 &
    fi
    PIDS+=($!)
    local pid=$! until=$((SECONDS + 15))
    while ((SECONDS < until)); do
        kill -0 "$pid" 2>/dev/null || break
        if ready "http://127.0.0.1:$port/lb-healthz"; then
            log "balancer $name ($LB_KIND, pid $pid) on port $port -> $*"
            return 0
        fi
        sleep 0.3
    done
    log "balancer $name ($LB_KIND) did not come up (logs/lb-$name.log)"
    return 1
}

scale_run() { # NAME URL CONCURRENCY DURATION
    local d="$D/lt/$1"
    mkdir -p "$d"
    for r in A B; do
        [[ $r == B && $B_OK != 1 ]] && continue
        "$PY" "$REPO/tools/loadtest_summary.py" fetch "$([[ $r == A ]] && echo "$URL_A" || echo "$URL_B")/metrics" \
            "$d/replica-$r-before.txt" 2>>"$D/logs/setup.log"
    done
    # shellcheck disable=SC2046
    lt "$1" $(($4 + 60)) --url "$2" --metrics-url "$URL_A/metrics" --concurrency "$3" --duration "$4" \
        --max-duration $(($4 + 40)) --response-format png $(policy_args "$SCALE_POLICY") "${COMMON[@]}" --out "$d"
    local rc=$?
    for r in A B; do
        [[ $r == B && $B_OK != 1 ]] && continue
        "$PY" "$REPO/tools/loadtest_summary.py" fetch "$([[ $r == A ]] && echo "$URL_A" || echo "$URL_B")/metrics" \
            "$d/replica-$r-after.txt" 2>>"$D/logs/setup.log"
    done
    return $rc
}

if [[ $B_OK == 1 ]]; then
    [[ "$SCALE_POLICY" == better ]] && SCALE_POLICY=$("$PY" "$REPO/tools/loadtest_summary.py" better-policy "$D")
    if [[ "$LB_WANT" != python ]] && find_nginx; then
        LB_KIND=nginx
    elif [[ "$LB_WANT" != nginx ]] && "$PY" -c "import aiohttp" 2>/dev/null; then
        LB_KIND=python
        [[ "$LB_WANT" == python ]] || log "nginx unusable (logs/lb.log): the balancer is tools/lb.py serve (aiohttp)"
    else
        fail "no balancer: nginx unusable and aiohttp missing (logs/lb.log)"
    fi
    if [[ -n "$LB_KIND" ]]; then
        if ! { start_lb lb1 "$PORT_LB1" "$PORT_A" && start_lb lb2 "$PORT_LB2" "$PORT_A" "$PORT_B"; }; then
            if [[ $LB_KIND == nginx && "$LB_WANT" != nginx ]] && "$PY" -c "import aiohttp" 2>/dev/null; then
                log "nginx did not serve: falling back to tools/lb.py serve"
                LB_KIND=python
                start_lb lb1 "$PORT_LB1" "$PORT_A" && start_lb lb2 "$PORT_LB2" "$PORT_A" "$PORT_B" || LB_KIND=""
            else
                LB_KIND=""
            fi
            [[ -z "$LB_KIND" ]] && fail "balancer did not start (logs/lb-*.log)"
        fi
    fi
    if [[ -n "$LB_KIND" ]] && (($(left) < 30)); then
        fail "scale-out skipped: $(left) s left"
        LB_KIND=""
    fi
    if [[ $LB_KIND == nginx ]]; then
        LB_DESC="nginx $("${NGINX_CMD[@]}" -v 2>&1 | sed 's|.*nginx/||') with deploy/nginx/nginx.conf (least_conn)"
    else
        LB_DESC="tools/lb.py serve (aiohttp, least connections)"
    fi
    if [[ -n "$LB_KIND" ]]; then
        if (($(left) < SCALE_NEED)); then
            SCALE_S=$(((($(left) - WARMUP_S - 36) / 2)))
            ((SCALE_S < 3)) && SCALE_S=3
            log "little time left ($(left) s): scale-out runs shortened to $SCALE_S s"
        fi
        if [[ -n "${ADSA_LT_WAIT_PID:-}" ]]; then  # other work on B's GPU (e.g. a fidelity run) ends first
            while kill -0 "$ADSA_LT_WAIT_PID" 2>/dev/null && (($(left) > SCALE_NEED)); do sleep 1; done
            log "GPU of B free (waited for pid $ADSA_LT_WAIT_PID)"
        fi
        log "warm-up of B: $CONC clients for $WARMUP_S s"
        lt warmup-B $((WARMUP_S + 60)) --url "$URL_B" --concurrency "$CONC" --duration "$WARMUP_S" --max-duration \
            $((WARMUP_S + 40)) --policies dense,adsa --budgets "$KV_BUDGET" "${COMMON[@]}" --no-metrics \
            --out "$D/lt/warmup-B" || log "warm-up of B failed (continuing)"
        log "scale-out ($SCALE_POLICY): one replica behind the balancer, $CONC clients x $SCALE_S s"
        scale_run scale-1 "$URL_LB1" "$CONC" "$SCALE_S" || fail "scale-1 (logs/lt-scale-1.log)"
        log "scale-out ($SCALE_POLICY): two replicas behind the balancer, $((2 * CONC)) clients x $SCALE_S s"
        scale_run scale-2 "$URL_LB2" $((2 * CONC)) "$SCALE_S" || fail "scale-2 (logs/lt-scale-2.log)"
        if (($(left) > SCALE_S + 30)); then
            log "reference: replica A directly (no balancer), $CONC clients x $SCALE_S s"
            scale_run scale-1-direct "$URL_A" "$CONC" "$SCALE_S" || log "direct run failed"
        fi
        "$PY" "$REPO/tools/loadtest_summary.py" scaleout "$D/lt/scale-1" "$D/lt/scale-2" --out "$D/scaleout.json" \
            --direct "$D/lt/scale-1-direct" --set "lb=$LB_DESC" --set "policy=$SCALE_POLICY" \
            --set "concurrency_per_replica=$CONC" --set "duration_s=$SCALE_S" 2>>"$D/logs/setup.log" |
            tee -a "$OUT/run.log" >&2 || fail "scaleout.json"
    fi
fi

# ---- 4. results ------------------------------------------------------------------------------------
for n in A B; do
    pid_var="PID_$n"
    kill -0 "${!pid_var}" 2>/dev/null || log "note: replica $n is no longer running (logs/server-$n.log)"
done
"$PY" "$REPO/tools/loadtest_summary.py" table "$D" >"$D/RESULTS.md" 2>>"$D/logs/setup.log" || fail "RESULTS.md"
log "done in $SECONDS s; failed steps: ${#FAILED[@]}"
echo "==== $OUT/RESULTS.md"
cat "$D/RESULTS.md"
[[ -f "$D/scaleout.json" ]] && "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("scale-out:", {k: d.get(k) for k in ("one_replica_images_per_s","two_replicas_images_per_s","ratio","meets_target","lb","policy","images_per_replica_during_two")})' "$D/scaleout.json"
for f in "${FAILED[@]}"; do echo "FAILED: $f"; done
((${#FAILED[@]} == 0))
