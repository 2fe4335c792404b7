"""Served speed on one GPU, in one device call: the server through HTTP beside `adsa-bench --compile`.

Each phase starts the real server (`python -m server`, GPT preset with random weights, the project's own
load tester as the client, PNG responses, closed loop) and records what a user gets, next to the offline
engine's number for the same settings measured in the same call. Results: $OUT/served.json and a markdown
table printed last (docs/PERFORMANCE.md copies it).

    python3 tools/device_served.py --out $OUT --configs dense:bf16,adsa0.25:bf16,adsa0.25:fp8 --bench
    python3 tools/device_served.py --out $OUT --configs adsa0.25:fp8 --restart      # cold, then warm start
    python3 tools/device_served.py --out $OUT --configs adsa0.25:fp8 --latency      # p50/p99 at 50 %, 90 %
    python3 tools/device_served.py --out $OUT --configs adsa0.25:fp8 --serve-old .device-carry/old  # A/B

--serve-old serves every config from a second tree too, after this one's, in the same call: the baseline a
change to the served path is judged by (run 17 in docs/PERFORMANCE.md: a change that made the engine's step
faster served 30 % fewer images). Make that tree here, from the commit to compare with (the demo model's
weights are not needed and would not fit a device call):

    mkdir -p .device-carry/old && git archive HEAD adsa_core server loadtest | tar -x -C .device-carry/old \
        --exclude adsa_core/assets/demo

Every wait is bounded; servers are stopped on exit. Commands run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from adsa_core.loading import MATMUL_DTYPES

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_config(text: str) -> dict:
    """'adsa0.25:fp8' -> policy adsa, budget 0.25, fp8 K/V; 'dense:bf16' -> dense, model dtype; a third field
    is the matmuls' dtype ('adsa0.25:fp8:fp8': fp8 matmuls too; left out: the model's)."""
    name, kv, *rest = text.split(":")
    policy = name.rstrip("0123456789.")
    budget = name[len(policy):] or None
    matmul = rest[0] if rest else "auto"
    if matmul not in MATMUL_DTYPES:
        raise SystemExit(f"config {text!r}: matmul dtype {matmul!r} is not one of {', '.join(MATMUL_DTYPES)}")
    return {"label": text, "policy": policy, "budget": float(budget) if budget else None,
            "kv": "fp8" if kv == "fp8" else "auto", "matmul": matmul}


class Server:
    def __init__(self, cfg: dict, a: argparse.Namespace, port: int, log_path: Path, tree: Path = REPO):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADSA_")}
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])  # its adsa_core
        env.update({
            "ADSA_HOST": "127.0.0.1", "ADSA_PORT": str(port), "ADSA_GPT_MODEL": a.gpt_model,
            "ADSA_IMAGE_SIZE": str(a.image_size), "ADSA_VQ_CKPT": a.vq_ckpt, "ADSA_KV_POLICY": cfg["policy"],
            "ADSA_KV_BUDGET": str(cfg["budget"]) if cfg["budget"] else "none", "ADSA_KV_CACHE_DTYPE": cfg["kv"],
            "ADSA_MATMUL_DTYPE": cfg["matmul"],
            "ADSA_COMPILE_CACHE_DIR": a.compile_cache, "ADSA_MAX_QUEUE": "4096", "ADSA_REQUEST_TIMEOUT_S": "600",
            "ADSA_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
        })
        if a.vq_autotune and tree == REPO:  # this tree only: --serve-old's trees compare against it
            env["ADSA_VQ_AUTOTUNE"] = "1"
        if a.max_batch:
            env["ADSA_MAX_BATCH_SIZE"] = str(a.max_batch)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_path.open("wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=tree, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s")

    def model(self) -> dict:
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=10).text):
            for s in fam.samples:
                if not s.labels or s.name.startswith("adsa_requests"):
                    key = s.name + ("" if not s.labels else json.dumps(s.labels, sort_keys=True))
                    out[key] = s.value
        return out

    def sample(self, stop: threading.Event, every_s: float = 0.5) -> list[tuple[float, dict[str, float]]]:
        """(time.monotonic(), /metrics) every `every_s` until `stop`, from a thread beside a load."""
        seen: list[tuple[float, dict[str, float]]] = []

        def run() -> None:
            while not stop.wait(every_s):
                with contextlib.suppress(httpx.HTTPError):
                    seen.append((time.monotonic(), self.metrics()))

        threading.Thread(target=run, daemon=True).start()
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def steady_window(samples: list[tuple[float, dict[str, float]]], start: float, end: float) -> dict[str, float]:
    """What the engine did between `start` and `end` (the load's steady part, no ramp, no drain): mean rows
    per decode step, mean images waiting for admission and how often none were (under a closed-loop load an
    empty queue with a batch not full means the clients' requests are held up outside the engine)."""
    win = [m for t, m in samples if start <= t <= end]
    if len(win) < 2:
        return {}
    waiting = [m.get("adsa_num_requests_waiting", 0.0) for m in win]
    out = {"mean_waiting": sum(waiting) / len(waiting), "queue_empty_share": waiting.count(0.0) / len(waiting)}

    def delta(key: str) -> float:
        return win[-1].get(key, 0.0) - win[0].get(key, 0.0)

    if (steps := delta("adsa_batch_size_count")) > 0:
        out["steady_mean_rows"] = delta("adsa_batch_size_sum") / steps
    return out


def loadtest(url: str, out: Path, a: argparse.Namespace, concurrency: int | None = None,
             rates: str | None = None, duration: float = 30.0) -> dict:
    cmd = [sys.executable, "-m", "loadtest", "--url", url, "--out", str(out), "--response-format", "png",
           "--cfg-scale", "4", "--top-k", "2000", "--classes", "207,360,387,974,88,979,417,279",
           "--duration", str(duration),
           "--requests", "100000", "--timeout", "300", "--drain-timeout", "120", "--slo-ms", "60000", "--quiet",
           "--max-duration", str(duration + 150)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency), "--ramp", str(a.ramp)]
    if rates:
        cmd += ["--rates", rates]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=duration + 200)
    return json.loads((out / "summary.json").read_text())


def bench_row(cfg: dict, a: argparse.Namespace, batch: int, tree: Path, out: Path) -> dict | None:
    policy, budget = cfg["policy"], cfg["budget"]
    # --bench-old trees from before adsa_core/eval/ have adsa_core/bench.py
    module = "adsa_core.eval.bench" if (tree / "adsa_core/eval/bench.py").is_file() else "adsa_core.bench"
    cmd = [sys.executable, "-m", module, "--presets", a.gpt_model, "--image-sizes", str(a.image_size),
           "--no-reference", "--compile", "--waves", "2", "--kv-cache-dtypes", cfg["kv"], "--out", str(out)]
    if cfg["matmul"] != "auto":  # older trees have no such option: only asked for when a config sets it
        cmd += ["--matmul-dtypes", cfg["matmul"]]
    if a.vq_autotune and tree == REPO:  # older trees have no such option
        cmd += ["--vq-autotune"]
    if policy == "dense":
        cmd += ["--batches", str(batch), "--policies", ""]
    else:
        cmd += ["--batches", "", "--sparse-batches", str(batch), "--policies", policy, "--budgets", str(budget)]
    r = subprocess.run(cmd, cwd=tree, timeout=a.bench_timeout, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"bench failed in {tree}: {r.stderr[-2000:]}")
        return None
    rows = json.loads((out / "bench.json").read_text())["rows"]
    return rows[-1] if rows else None


def stage(summary: dict) -> dict:
    s = summary["stages"][-1]
    keep = ("concurrency", "offered_rps", "ok", "errors", "steady_images_per_s", "achieved_images_per_s",
            "latency_p50_s", "latency_p99_s", "server_queue_p99_s")
    return {k: s.get(k) for k in keep}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out/served"))
    p.add_argument("--configs", default="adsa0.25:fp8")
    p.add_argument("--gpt-model", default="GPT-XL")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--max-batch", type=int, default=0, help="0: the server's default (from the KV pool)")
    p.add_argument("--compile-cache", default="/tmp/adsa-compile-cache")
    p.add_argument("--vq-autotune", action="store_true",
                   help="ADSA_VQ_AUTOTUNE=1 for this tree's servers and --bench rows, not --serve-old's or "
                        "--bench-old's (the first start compiles for minutes: --ready-timeout)")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--ramp", type=float, default=3.0)
    p.add_argument("--clients", type=float, default=3.0,
                   help="closed-loop clients per image of max batch; at 2 the batch ran part-empty while images "
                        "were on their way back to clients (run 18), at 3 it stayed full (run 33)")
    p.add_argument("--bench", action="store_true", help="adsa-bench --compile for the same settings and batch")
    p.add_argument("--bench-old", default="", help="also bench this tree (the previous commit) for comparison")
    p.add_argument("--bench-timeout", type=float, default=240)
    p.add_argument("--restart", action="store_true", help="after the load, restart: warm start (compile cache)")
    p.add_argument("--latency", action="store_true", help="open loop at 50 %% and 90 %% of the probe")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--serve-old", type=Path, default=None,
                   help="also serve every config from this tree (adsa_core, server), same method, same call")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.vq_ckpt = "/tmp/adsa_vq_random.pt"  # random VQ-16 weights: the images cost a real decode
    if not Path(a.vq_ckpt).exists():
        import torch

        from adsa_core.config import VQConfig
        from adsa_core.model.vq import VQModel

        torch.save(VQModel(VQConfig()).state_dict(), a.vq_ckpt)
    results = []
    configs = a.configs.split(",")
    runs = [(text, REPO) for text in configs] + [(text, a.serve_old.resolve()) for text in configs if a.serve_old]
    for i, (text, tree) in enumerate(runs):
        cfg = parse_config(text)
        old = tree != REPO
        row: dict = {"config": text + (" (old tree)" if old else "")}
        srv = Server(cfg, a, 8200 + i, out / f"server-{i}.log", tree)
        try:
            row["start_cold_s"] = srv.wait_ready(a.ready_timeout)
            model = srv.model()
            row["max_batch"] = model["limits"]["max_batch_size"]
            log(f"{text}: ready in {row['start_cold_s']:.1f} s, max batch {row['max_batch']}")
            clients = max(8, int(a.clients * row["max_batch"]))
            m0 = srv.metrics()
            sampling = threading.Event()
            samples = srv.sample(sampling)
            t0 = time.monotonic()
            probe = loadtest(srv.url, out / f"lt-{i}-probe", a, concurrency=clients, duration=a.duration)
            sampling.set()
            row.update(steady_window(samples, t0 + a.ramp + 1.0, t0 + a.duration - 1.0))
            m1 = srv.metrics()
            row["http"] = stage(probe)
            d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
            steps = d.get("adsa_engine_steps_total", 0)
            if steps:
                row["step_device_ms"] = 1e3 * d.get("adsa_decode_step_seconds_sum", 0) / max(
                    1, d.get("adsa_decode_step_seconds_count", 0))
                row["device_busy"] = d.get("adsa_engine_device_busy_seconds_total", 0) / max(
                    1e-9, d.get("adsa_engine_step_period_seconds_total", 0))
                row["mean_rows"] = d.get("adsa_batch_size_sum", 0) / max(1, d.get("adsa_batch_size_count", 0))
                row["loop_busy_s_per_step_ms"] = 1e3 * d.get("adsa_engine_loop_busy_seconds_total", 0) / steps
                if chunks := d.get("adsa_image_decode_chunks_total", 0):
                    row["chunk_fill"] = d.get("adsa_images_generated_total", 0) / chunks
            log(f"{text}: HTTP {row['http']}")
            if a.latency:
                cap = row["http"]["steady_images_per_s"] or 1.0
                lat = loadtest(srv.url, out / f"lt-{i}-open", a, rates=f"{0.5 * cap:.2f},{0.9 * cap:.2f}",
                               duration=a.duration)
                row["open_loop"] = [dict(stage(lat | {"stages": [s]}), fraction=f)
                                    for s, f in zip(lat["stages"], (0.5, 0.9))]
                lone = loadtest(srv.url, out / f"lt-{i}-lone", a, concurrency=1, duration=min(20, a.duration))
                row["lone"] = stage(lone)
        except Exception as e:  # noqa: BLE001 - record and go on with the next config
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"{text}: {row['error']}")
        finally:
            srv.stop()
        if a.restart and not old and "error" not in row:
            srv = Server(cfg, a, 8300 + i, out / f"server-{i}-warm.log")
            try:
                row["start_warm_s"] = srv.wait_ready(a.ready_timeout)
                log(f"{text}: warm start {row['start_warm_s']:.1f} s")
            except Exception as e:  # noqa: BLE001
                row["warm_error"] = str(e)
            finally:
                srv.stop()
        if a.bench and not old and row.get("max_batch"):
            b = bench_row(cfg, a, row["max_batch"], REPO, out / f"bench-{i}")
            row["offline_img_s"] = b and b["img_per_s"]
            if a.bench_old:
                b = bench_row(cfg, a, row["max_batch"], Path(a.bench_old).resolve(), out / f"bench-old-{i}")
                row["offline_old_img_s"] = b and b["img_per_s"]
            log(f"{text}: offline {row.get('offline_img_s')} (old tree {row.get('offline_old_img_s')})")
        results.append(row)
        (out / "served.json").write_text(json.dumps(results, indent=1))
    print("| config | max batch | start cold s | start warm s | HTTP img/s | p50 s | p99 s | offline img/s | "
          "HTTP/offline | device ms/step | device busy | mean rows | steady rows | loop ms/step | VQ chunk fill | "
          "steady waiting | queue empty |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        h = r.get("http", {})
        off = r.get("offline_img_s")
        img = h.get("steady_images_per_s")
        ratio = f"{img / off:.2f}" if img and off else "-"
        print(f"| {r['config']} | {r.get('max_batch')} | {r.get('start_cold_s', 0):.1f} | "
              f"{r.get('start_warm_s', 0):.1f} | {img or 0:.2f} | {h.get('latency_p50_s') or 0:.2f} | "
              f"{h.get('latency_p99_s') or 0:.2f} | {off or 0:.2f} | {ratio} | {r.get('step_device_ms', 0):.2f} | "
              f"{r.get('device_busy', 0):.2f} | {r.get('mean_rows', 0):.1f} | {r.get('steady_mean_rows', 0):.1f} | "
              f"{r.get('loop_busy_s_per_step_ms', 0):.2f} | {r.get('chunk_fill', 0):.1f} | "
              f"{r.get('mean_waiting', 0):.1f} | {r.get('queue_empty_share', 0):.2f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
