"""The engine-core process never outlives its server, also while it loads and warms up (minutes on a GPU,
when it ignores SIGTERM): a server that stops during the load kills its core and waits for it; a core
whose API process is gone (a server that failed to bind its port, or was killed) exits by itself."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from server_live import TINY_GPT

from adsa_core.config import EngineConfig
from adsa_core.engine.core import IPC_DIR_PREFIX, launch_args, socket_dir
from adsa_core.loading import ModelSpec
from server import Settings, create_app

pytestmark = pytest.mark.anyio


def engine_children() -> list[int]:
    """Pids of this process's children that run the engine core (not yet reaped)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == os.getpid() and b"adsa_core.engine" in cmdline:
            out.append(int(stat.parent.name))
    return out


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan's new parent may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_server_stopped_while_its_engine_loads_kills_the_engine():
    app = create_app(Settings(_env_file=None, device="cpu"))  # the demo model: seconds of loading on a CPU
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 30
        while not (cores := engine_children()):
            assert time.monotonic() < deadline, "no engine process started"
            await asyncio.sleep(0.05)
        assert not app.state.runtime.ready  # still loading when the server stops
    assert cores and not any(running(pid) for pid in cores) and not engine_children()


def test_an_engine_whose_server_is_gone_exits_while_loading_and_removes_the_sockets(tmp_path):
    """A killed server cannot remove its socket folder (/tmp/adsa-ipc-*): its orphaned core does."""
    sockets = Path(tempfile.mkdtemp(prefix=IPC_DIR_PREFIX, dir=tmp_path))
    spec = ModelSpec(gpt_config=json.dumps(TINY_GPT), device="cpu")
    args = launch_args(spec, EngineConfig(max_batch_size=1), f"ipc://{sockets}/in", f"ipc://{sockets}/out")
    # a stand-in server: starts the core as ProcessEngineClient does (its own pid as the parent), then dies at once
    stand_in = ("import os, subprocess, sys; args = sys.argv[1:]; "
                "args[args.index('--parent-pid') + 1] = str(os.getpid()); "
                "print(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    core = int(subprocess.run([sys.executable, "-c", stand_in, *args], capture_output=True, text=True,
                              check=True).stdout)
    deadline = time.monotonic() + 30
    while running(core):  # the core notices within ORPHAN_POLL_S of starting, before it loads anything
        assert time.monotonic() < deadline, "the orphaned engine process is still running"
        time.sleep(0.05)
    assert not sockets.exists() and tmp_path.exists()  # its own folder only
    assert socket_dir("ipc:///tmp/in") is None and socket_dir("tcp://127.0.0.1:5555") is None  # never another


async def test_an_abandoned_client_frees_everything_and_a_stop_it_cut_short_says_nothing():
    # a forced exit (a second Ctrl-C) abandons the engine while a stop waits for the requests to end: that stop,
    # resumed, must send nothing on the destroyed sockets (a zmq.asyncio send fails in a future nobody awaits:
    # a traceback in the log at exit)
    from adsa_core.engine.client import ProcessEngineClient

    client = ProcessEngineClient(ModelSpec(gpt_config=json.dumps(TINY_GPT), device="cpu"), EngineConfig())
    client._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a core that hangs
    delivered: list = []

    class Pending:  # a request in flight: only abandon() ends it (the hung core never answers the abort)
        def deliver(self, event):
            delivered.append(event)

    client._handles["r1"] = Pending()  # type: ignore[assignment]
    sent: list = []
    send = client._to_core.send
    client._to_core.send = lambda *a, **kw: sent.append(a) or send(*a, **kw)  # type: ignore[method-assign]
    stop = asyncio.create_task(client.shutdown(drain=False))
    while not sent:  # the stop sent its abort and waits for the request to end
        await asyncio.sleep(0.01)
    client.abandon()
    assert client._proc.wait(5) is not None and not Path(client._dir).exists()
    assert [type(e).__name__ for e in delivered] == ["EngineDraining"]
    await asyncio.wait_for(stop, 5)  # resumed: it ends without sending its "stop"
    assert len(sent) == 1  # the abort, before abandon()
