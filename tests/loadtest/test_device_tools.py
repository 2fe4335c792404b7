"""The device load test's helpers: tools/lb.py (nginx config from deploy/nginx, the asyncio
fallback balancer), tools/loadtest_summary.py (scale-out verdict, tables) and the shell script's
syntax. The script itself runs end to end in CPU mode (ADSA_LT_DEVICE=cpu, ~2 min): too long here."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lb = _tool("lb")
summary_tool = _tool("loadtest_summary")


def test_script_syntax():
    subprocess.run(["bash", "-n", str(REPO / "tools" / "device_loadtest.sh")], check=True)


def test_nginx_conf_keeps_the_deployed_policy(tmp_path):
    conf = lb.nginx_conf(["127.0.0.1:8101", "127.0.0.1:8102"], 8111, tmp_path, workers=2, user="root root")
    template = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    for directive in (
        "least_conn;",
        "keepalive 64;",
        "proxy_buffering off;",
        "proxy_next_upstream error http_429 http_503 non_idempotent;",
        "proxy_next_upstream_tries 2;",
        "proxy_read_timeout 330s;",
    ):
        assert directive in template and directive in conf, directive
    assert "server 127.0.0.1:8101 max_fails=3 fail_timeout=10s;" in conf
    assert "server 127.0.0.1:8102 max_fails=3 fail_timeout=10s;" in conf
    assert "adsa-serve:8000" not in conf and "adsa-serve-gpu1" not in conf
    assert "listen 127.0.0.1:8111;" in conf and "daemon off;" in conf and "user root root;" in conf
    assert "/tmp/" not in conf.replace(str(tmp_path.resolve()), "")  # every path under the prefix
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f"{kind}_temp_path {tmp_path.resolve()}/{kind};" in conf
    with pytest.raises(lb.TemplateError):
        lb.nginx_conf(["127.0.0.1:1"], 1, tmp_path, template=template.replace("least_conn;", ""))
    with pytest.raises(ValueError):
        lb.nginx_conf(["no-port"], 1, tmp_path)


@pytest.mark.skipif(not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists(), reason="no nginx here")
def test_nginx_accepts_the_generated_config(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert (
        lb.main(
            [
                "nginx-conf",
                "--listen",
                "18111",
                "--upstream",
                "127.0.0.1:18101",
                "--prefix",
                str(tmp_path),
                "--out",
                str(tmp_path / "nginx.conf"),
            ]
        )
        == 0
    )
    r = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def test_balancer_picks_the_least_loaded_in_turn():
    b = lb.Balancer(["a", "b", "c"])
    assert [b.pick([]) for _ in range(3)] == ["a", "b", "c"]  # ties in turn
    b.open.update(a=2, b=0, c=1)
    assert b.pick([]) == "b" and b.pick(["b"]) == "c"
    assert b.pick(["a", "b", "c"]) is None


def test_python_balancer_spreads_and_retries(make_fake_server):
    pytest.importorskip("aiohttp")
    from aiohttp import web

    with make_fake_server(slots=4, service_s=0.05, max_queue=100) as good, make_fake_server(max_queue=0) as full:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        box: dict = {}

        async def start() -> None:
            app = lb.make_app([good.url.removeprefix("http://"), full.url.removeprefix("http://")])
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            box.update(runner=runner, app=app, port=site._server.sockets[0].getsockname()[1])

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert started.wait(10)
        try:
            url = f"http://127.0.0.1:{box['port']}"
            with httpx.Client(timeout=10, trust_env=False) as c:
                assert c.get(url + "/lb-healthz").text == "ok\n"
                assert c.get(url + "/metrics").status_code == 404
                statuses = [c.post(url + "/v1/generate", json={"class_label": 1}).status_code for _ in range(6)]
            # every second request goes to the full replica first (429) and is retried on the other
            assert statuses == [200] * 6
            assert full.state.generate_calls >= 2 and good.state.generate_calls == 6
            assert box["app"]["balancer"].served[good.url.removeprefix("http://")] == 6
        finally:
            asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


def _summary(capacity, p99_50, p99_90, conc_ips=None):
    stage = {
        "mode": "concurrency",
        "concurrency": 8,
        "steady_images_per_s": conc_ips,
        "achieved_images_per_s": 1.0,
        "latency_p50_s": 1.0,
        "latency_p99_s": 2.0,
        "ok": 10,
        "rejected_429": 0,
        "errors": 0,
    }
    return {
        "url": "http://127.0.0.1:1",
        "stages": [stage],
        "totals": {"rejected_429": 0, "errors": 1},
        "server_totals": {"adsa_kv_evictions_total": 123.0},
        "saturation": {
            "saturation_images_per_s": capacity,
            "saturation_point_images_per_s": 0.9 * capacity,
            "capacity_images_per_s": capacity,
            "at": {
                "0.5": {"latency_p50_s": 0.5, "latency_p99_s": p99_50},
                "0.9": {"latency_p50_s": 0.9, "latency_p99_s": p99_90},
            },
        },
    }


def test_summary_scaleout_and_table(tmp_path):
    out = tmp_path
    runs = {
        "dense": _summary(40.0, 1.5, 3.0),
        "adsa": _summary(44.0, 1.4, 2.5),
        "scale-1": _summary(40.0, 1, 1, conc_ips=40.0),
        "scale-2": _summary(40.0, 1, 1, conc_ips=76.0),
    }
    for name, s in runs.items():
        d = out / "lt" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
    two = out / "lt" / "scale-2"
    for r, (before, after) in {"A": (10, 50), "B": (0, 37)}.items():
        (two / f"replica-{r}-before.txt").write_text(f'# TYPE x counter\nadsa_images_generated_total{{a="1"}} {before}')
        (two / f"replica-{r}-after.txt").write_text(f'adsa_images_generated_total{{a="1"}} {after}\n')
    assert summary_tool.better_policy(out) == "adsa"
    assert (
        summary_tool.main(
            [
                "scaleout",
                str(out / "lt" / "scale-1"),
                str(two),
                "--out",
                str(out / "scaleout.json"),
                "--set",
                "lb=nginx",
                "--set",
                "policy=adsa",
            ]
        )
        == 0
    )
    sc = json.loads((out / "scaleout.json").read_text())
    assert sc["ratio"] == pytest.approx(1.9) and sc["meets_target"] and sc["lb"] == "nginx"
    assert sc["images_per_replica_during_two"] == {"A": 40.0, "B": 37.0}
    (out / "env.json").write_text(
        json.dumps(
            {
                "date": "D",
                "gpus": "GPU 0: H100",
                "torch": "T",
                "commit": "C",
                "settings": {
                    "model": "GPT-L",
                    "image_size": "256",
                    "slo_ms": "20000",
                    "budget": "0.25",
                    "device": "cuda",
                },
            }
        )
    )
    md = summary_tool.table(out)
    assert "| dense | 40 | 36 | 40 | 0.5 / 1.5 | 0.9 / 3 | 0 / 1 | 123 |" in md
    assert "| adsa, budget 0.25 | 44 |" in md
    assert "Ratio two / one: **1.9x**" in md and "GPT-L 256 px" in md and "GPU 0: H100" in md
    assert "40 / 37" in md
    assert summary_tool.images_total('adsa_images_generated_total 3\nadsa_images_generated_total{x="y"} 2\n') == 5
    assert summary_tool.images_total("other 1\n") is None


def test_summary_table_without_runs(tmp_path):
    md = summary_tool.table(tmp_path)
    assert "| dense | no run |" in md and "no scaleout.json" in md
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "loadtest_summary.py"), "better-policy", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # as tools/device_loadtest.sh runs it
    )
    assert r.stdout.strip() == "adsa"


def test_device_served_reads_the_engine_over_the_steady_window_only():
    """Rows per step and the queue from /metrics snapshots inside [start, end]: the ramp's and the drain's
    small batches do not count, and an empty queue is counted as such."""
    served = _tool("device_served")

    def snap(t: float, steps: float, rows: float, waiting: float) -> tuple[float, dict[str, float]]:
        return t, {"adsa_batch_size_count": steps, "adsa_batch_size_sum": rows, "adsa_num_requests_waiting": waiting}

    samples = [snap(0, 10, 50, 0), snap(1, 20, 1000, 5), snap(2, 120, 101000, 0), snap(3, 220, 201000, 7),
               snap(4, 230, 201100, 0)]
    got = served.steady_window(samples, 1, 3)
    assert got["steady_mean_rows"] == (201000 - 1000) / (220 - 20)
    assert got["mean_waiting"] == 4 and got["queue_empty_share"] == 1 / 3
    assert served.steady_window(samples, 5, 9) == {}


def test_device_served_configs_name_policy_kv_and_matmul_dtypes():
    """'policy[budget]:kv[:matmul]'; a matmul dtype the server would refuse at start-up is refused here."""
    parse = _tool("device_served").parse_config
    assert parse("adsa0.25:fp8:fp8") == {"label": "adsa0.25:fp8:fp8", "policy": "adsa", "budget": 0.25, "kv": "fp8",
                                         "matmul": "fp8"}
    assert parse("dense:bf16") == {"label": "dense:bf16", "policy": "dense", "budget": None, "kv": "auto",
                                   "matmul": "auto"}
    with pytest.raises(SystemExit, match="matmul dtype 'bf16' is not one of auto, fp8"):
        parse("dense:bf16:bf16")
