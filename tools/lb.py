"""The load balancer of the device load test (tools/device_loadtest.sh): nginx's config, or a small
asyncio balancer with the same policy where nginx cannot run.

    python3 tools/lb.py nginx-conf --listen 8111 --upstream 127.0.0.1:8101 --upstream 127.0.0.1:8102 \\
        --prefix /tmp/lb2 --out /tmp/lb2/nginx.conf
    nginx -p /tmp/lb2 -c /tmp/lb2/nginx.conf -e /tmp/lb2/error.log
    python3 tools/lb.py serve --listen 8111 --upstream 127.0.0.1:8101 --upstream 127.0.0.1:8102

`nginx-conf` rewrites deploy/nginx/nginx.conf, the balancer of the compose multi-GPU setup, for one
foreground process on loopback. The upstream policy stays as it is there: least_conn, keepalive to
the replicas, unbuffered responses (SSE), one retry on another replica after a connection error,
429 or 503, none after a timeout. Only the replicas, the listen address, the worker count and every
path (pid, logs, temp files: all under --prefix) change, and the access log is off.

`serve` is the fallback for a machine where the carried nginx does not start: aiohttp (it is on the
device; not a project dependency), the same policy: the replica with the fewest open requests (ties
in turn), bodies streamed through chunk by chunk, one retry on another replica after a connection
error, 429 or 503, none after a timeout; /lb-healthz answers 200, /metrics 404.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf"
UPSTREAM_OPTS = "max_fails=3 fail_timeout=10s"


class TemplateError(ValueError):
    """deploy/nginx/nginx.conf no longer has a line this rewrite expects."""


def _sub_once(pattern: str, repl: str, text: str) -> str:
    new, n = re.subn(pattern, lambda _: repl, text, count=1, flags=re.MULTILINE)
    if n != 1:
        raise TemplateError(f"deploy/nginx/nginx.conf: no line matches {pattern!r}")
    return new


def nginx_conf(
    upstreams: list[str],
    listen: int,
    prefix: str | Path,
    workers: int | str = "auto",
    user: str | None = None,
    template: str | None = None,
    host: str = "127.0.0.1",
) -> str:
    """deploy/nginx/nginx.conf for one foreground nginx on host:listen in front of `upstreams`."""
    if not upstreams:
        raise ValueError("at least one upstream (host:port)")
    for u in upstreams:
        if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", u):
            raise ValueError(f"upstream {u!r} is not host:port")
    text = template if template is not None else TEMPLATE.read_text()
    p = str(Path(prefix).resolve())
    text = _sub_once(r"^worker_processes\s+\S+;", f"daemon off;\nworker_processes {workers};", text)
    if user:
        text = _sub_once(r"^daemon off;", f"daemon off;\nuser {user};", text)
    text = _sub_once(r"^pid\s+\S+;", f"pid {p}/nginx.pid;", text)
    text = _sub_once(r"^error_log\s+\S+(\s+\w+)?;", f"error_log {p}/error.log warn;", text)
    text = _sub_once(r"^(\s*)access_log\s+/dev/stdout;", r"    access_log off;", text)
    text = _sub_once(r"^(\s*)client_body_temp_path\s+\S+;", f"    client_body_temp_path {p}/client_body;", text)
    temp = "\n".join(f"    {kind}_temp_path {p}/{kind};" for kind in ("proxy", "fastcgi", "uwsgi", "scgi"))
    text = _sub_once(r"^(\s*)proxy_temp_path\s+\S+;", temp, text)
    block = re.search(r"(upstream adsa_serve \{\n)(.*?)(\n    \})", text, flags=re.DOTALL)
    if block is None or "least_conn;" not in block.group(2):
        raise TemplateError("deploy/nginx/nginx.conf: no `upstream adsa_serve` block with least_conn")
    kept = [line for line in block.group(2).split("\n") if not re.match(r"\s*server\s", line)]
    at = next(i for i, line in enumerate(kept) if "least_conn;" in line) + 1
    kept[at:at] = [f"        server {u} {UPSTREAM_OPTS};" for u in upstreams]
    text = text[: block.start(2)] + "\n".join(kept) + text[block.end(2) :]
    text = _sub_once(r"^(\s*)listen\s+\d+;", f"        listen {host}:{listen};", text)
    return text


# ---- the asyncio fallback --------------------------------------------------------------------------

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
}
RETRY_STATUSES = (429, 503)


class Balancer:
    """Fewest open requests first; ties in turn. Counts are this process's own open requests."""

    def __init__(self, upstreams: list[str]):
        self.upstreams = list(upstreams)
        self.open = dict.fromkeys(self.upstreams, 0)
        self.served = dict.fromkeys(self.upstreams, 0)
        self._turn = itertools.count()

    def pick(self, exclude: list[str]) -> str | None:
        candidates = [u for u in self.upstreams if u not in exclude]
        if not candidates:
            return None
        least = min(self.open[u] for u in candidates)
        ties = [u for u in candidates if self.open[u] == least]
        return ties[next(self._turn) % len(ties)]


def make_app(upstreams: list[str], read_timeout_s: float = 330.0, connect_timeout_s: float = 5.0):
    from aiohttp import ClientConnectionError, ClientSession, ClientTimeout, TCPConnector, web

    lb = Balancer(upstreams)
    state: dict = {}

    async def on_startup(app) -> None:
        state["session"] = ClientSession(
            connector=TCPConnector(limit=0, keepalive_timeout=60),
            timeout=ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s),
            auto_decompress=False,
        )

    async def on_cleanup(app) -> None:
        await state["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/lb-healthz":
            return web.Response(text="ok\n")
        if request.path == "/metrics":
            return web.Response(status=404, text="per-replica metrics are not exposed through the balancer\n")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        tried: list[str] = []
        while True:
            up = lb.pick(tried)
            if up is None:
                return web.Response(status=502, text="no replica answered\n")
            tried.append(up)
            lb.open[up] += 1
            try:
                try:
                    resp = await state["session"].request(
                        request.method, f"http://{up}{request.rel_url}", headers=headers, data=body
                    )
                except ClientConnectionError:
                    if len(tried) < 2:
                        continue  # nginx: proxy_next_upstream error, 2 tries
                    return web.Response(status=502, text="replica connection failed\n")
                async with resp:
                    if resp.status in RETRY_STATUSES and len(tried) < 2 and len(tried) < len(lb.upstreams):
                        await resp.read()
                        continue
                    # counted once the answer is this replica's, before any byte reaches the client: a client
                    # holding its whole response must find it counted (counting after write_eof raced that in CI)
                    lb.served[up] += 1
                    out = web.StreamResponse(status=resp.status, reason=resp.reason)
                    for k, v in resp.headers.items():
                        if k.lower() not in HOP_BY_HOP:
                            out.headers.add(k, v)
                    await out.prepare(request)
                    async for chunk in resp.content.iter_any():
                        await out.write(chunk)
                    await out.write_eof()
                    return out
            finally:
                lb.open[up] -= 1

    app = web.Application(client_max_size=1 << 20)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    app["balancer"] = lb
    return app


def serve(upstreams: list[str], listen: int, host: str = "127.0.0.1") -> None:
    from aiohttp import web

    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(f"lb.py: least-connections balancer on {host}:{listen} -> {', '.join(upstreams)}", flush=True)
    web.run_app(make_app(upstreams), host=host, port=listen, access_log=None, print=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/lb.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("nginx-conf", "serve"):
        sp = sub.add_parser(name)
        sp.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
        sp.add_argument("--upstream", action="append", required=True, help="replica host:port (repeat)")
        if name == "nginx-conf":
            sp.add_argument("--prefix", required=True, help="folder for pid, logs and temp files")
            sp.add_argument("--workers", default="auto", help="worker_processes (default auto, as deployed)")
            sp.add_argument("--user", default=None, help="`user` directive, e.g. 'root root' when run as root")
            sp.add_argument("--out", type=Path, default=None, help="write here (default stdout)")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.upstream, args.listen)
        return 0
    try:
        text = nginx_conf(args.upstream, args.listen, args.prefix, args.workers, args.user)
    except ValueError as e:
        print(f"tools/lb.py: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        Path(args.prefix).mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
