"""The engine-core process: owns the GPU and runs schedule -> step -> update in a busy loop.

Started by the engine client (`client.py`) as `python -m adsa_core.engine`, as vLLM v1's API
server starts its EngineCore. It loads the models, warms up (every batch bucket's CUDA graph, compiled
where configured, the VQ decoder, one tiny generation), says ready, then loops: take what arrived on
the input socket without waiting while there is work, step, send the step's events and stats. It never
waits on HTTP work: JSON, base64, PNG and sockets to clients live in the API process.

Events of finished images come from the loop too: each step the engine hands out the chunks whose VQ
decode completed (an event query), so the core has one thread and one output socket.

A step that raises fails the requests in its batch (logged with their ids) and the loop goes on;
three failures in a row, or an error while failing them, end the process, which the client sees.
The core ignores SIGINT and SIGTERM (the API process drains and then tells it to stop) and exits
when its parent dies, from its first moment on (`_exit_when_orphaned`), so it never outlives the server
holding the GPU: not while serving, and not while it loads and warms up, which takes minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq

from ..config import CacheConfig, ConfigError, EngineConfig, min_budget
from ..kv.policy import policy_names
from ..loading import LoadedModels, ModelSpec, load_models
from ..logfmt import log_formatter
from . import wire
from .engine import Engine
from .imaging import VQ_AUTOTUNE_MODE
from .request import EngineDraining, EngineError, Event, GenerationRequest, InvalidRequest, ModelInfo, RequestFailed
from .step_clock import StepTiming

log = logging.getLogger("adsa.engine")

IDLE_POLL_MS = 200  # how long an idle loop waits for input before it sends stats (its sign of life)
ORPHAN_POLL_S = 0.2  # how often the core looks whether the API process that started it is still there
IPC_DIR_PREFIX = "adsa-ipc-"  # the temporary folder of a client's sockets: the orphaned core removes it
STATS_EVERY_S = 0.05  # stats go out with events at most this often while busy (and whenever idle)
MAX_FAILED_STEPS = 3  # consecutive failing steps that mean the engine is broken, not one batch


class Outbox:
    """Events for the client, batched per loop iteration (`EngineCore.flush`)."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(address)
        self.batch: list[list[Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.send(wire.dumps(msg), copy=False)

    def sink(self, rid: str) -> Callable[[Event | EngineError], None]:
        return lambda ev: self.batch.append(wire.event_to_wire(rid, ev))


class EngineCore:
    def __init__(self, models: LoadedModels, config: EngineConfig, outbox: Outbox):
        self.models, self.outbox = models, outbox
        self.engine = Engine(models, config)
        self.steps: list[StepTiming] = []
        self.engine.step_listeners.append(self.steps.append)
        self.last_stats = 0.0
        self.failed_steps = 0

    def warm_up(self) -> float:
        """Every batch bucket's decode graph (and its compile), the VQ decoder, then one tiny generation, so
        that no request waits for lazy initialisation. Returns the seconds it took."""
        t0 = time.perf_counter()
        eng = self.engine
        if n := eng.capture_graphs():
            log.info("captured %d decode graphs in %.1f s", n, time.perf_counter() - t0)
        cfg = self.models.gpt_config
        if eng.images.compile_mode == VQ_AUTOTUNE_MODE:  # an operator would otherwise see a silent start minutes long
            log.info("VQ decoder: compiling with max-autotune (minutes, unless the compile cache holds it)")
        if eng.images.vq is not None:
            t_vq = time.perf_counter()
            eng.images.warm_up(cfg.block_size)
            log.info("VQ decoder ready in %.1f s", time.perf_counter() - t_vq)
        cond: Any = 0 if cfg.model_type == "c2i" else None
        prompt = None if cfg.model_type == "c2i" else "warm-up"
        req = GenerationRequest(condition=cond, prompt=prompt, seed=0, request_id="warm-up")
        if prompt is not None and self.models.text_encoder is None:  # no encoder: zero caption features
            import torch

            req.condition, req.prompt = torch.zeros(cfg.cls_token_num, cfg.caption_dim), None
        try:
            eng.submit(req, lambda ev: None)
        except InvalidRequest as e:  # a request with the default settings could never run: the settings are wrong
            raise ConfigError(f"a request with the default settings cannot run: {e}") from None
        while eng.has_work:  # until the image stage has handed out its image too
            eng.step()
        eng.stats_.requests_total_by_status.clear()
        eng.stats_.images_total = eng.stats_.tokens_total = eng.stats_.steps_total = 0
        eng.images.chunks_launched = 0
        eng.stats_.host_busy_s_total = 0.0
        self.steps.clear()
        eng.clock.reset()
        return time.perf_counter() - t0

    # --- the loop ------------------------------------------------------------------------------------
    def run(self, inbox: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        while True:
            busy = self.engine.has_work
            if poller.poll(0 if busy else IDLE_POLL_MS):
                while True:
                    try:
                        msg = wire.loads(inbox.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if not self.handle(msg):
                        return
            if self.engine.has_work:
                self.step()
            elif busy:
                self.engine.clock.reset()  # went idle: the next step's period must not count the pause
            self.flush(force=not self.engine.has_work)

    def step(self) -> None:
        try:
            self.engine.step()
            self.failed_steps = 0
        except Exception:
            failed = self.engine.fail_running()
            self.failed_steps += 1
            log.exception("engine step failed (%d in a row); failed requests: %s", self.failed_steps,
                          ", ".join(failed) or "none")
            if self.failed_steps >= MAX_FAILED_STEPS:
                raise
            _free_cached_device_memory()

    def handle(self, msg: dict[str, Any]) -> bool:
        """One client message; False means stop."""
        t = msg["t"]
        if t == "add":
            error = None
            try:
                reqs = [wire.request_from_wire(d) for d in msg["reqs"]]
                self.engine.submit_all(reqs, [self.outbox.sink(r.request_id) for r in reqs])
            except EngineError as e:
                error = wire.error_to_wire(e)
            except Exception:  # noqa: BLE001 - e.g. the text encoder failed: refuse these, keep serving
                log.exception("queueing requests %s failed", ", ".join(str(d.get("id")) for d in msg["reqs"]))
                error = wire.error_to_wire(RequestFailed("internal error while queueing the request"))
            self.outbox.send({"t": "ack", "batch": msg["batch"], "error": error})
        elif t == "abort":
            for rid in msg["ids"]:
                self.engine.cancel(rid)
        elif t == "abort_all":
            self.engine.fail_all(EngineDraining("the server shut down before this request finished"), "aborted")
        elif t == "stop":
            return False
        return True

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        stats = None
        if force or now - self.last_stats >= STATS_EVERY_S:
            stats, self.last_stats = wire.stats_to_wire(self.engine.stats()), now
        if self.outbox.batch or self.steps or stats is not None:
            steps = [[t.device_s, t.period_s, t.rows] for t in self.steps]
            self.outbox.send({"t": "out", "events": self.outbox.batch, "stats": stats, "steps": steps})
            self.outbox.batch, self.steps[:] = [], []

    def close(self) -> None:
        self.engine.close()  # waits for the image stage: finished images still go out
        self.flush(force=True)


def model_info(models: LoadedModels, engine: Engine) -> ModelInfo:
    cfg = models.gpt_config
    c, regions = engine.default_cache, engine.config.default_cache  # regions as set (None: default_regions)
    return ModelInfo(
        name=models.name, model_type=cfg.model_type, image_size=models.image_size,
        num_classes=cfg.num_classes if cfg.model_type == "c2i" else 0, classes=models.classes,
        policies=policy_names(), default_policy=c.policy, default_budget=c.budget,
        min_budget=min_budget(cfg, regions.prefix, regions.local), seq_len=cfg.seq_len,
        max_batch_size=engine.max_batch_size, max_images_per_call=engine.scheduler.queue_capacity,
        sampling_defaults=dict(models.sampling_defaults),
        kv_cache_dtype=str(engine.runner.geo.dtype).removeprefix("torch."),
        kv_pool_bytes=engine.stats_.kv_pool_bytes, device=str(models.device),
        has_text_encoder=models.text_encoder is not None, has_decoder=engine.images.vq is not None,
    )


def _free_cached_device_memory() -> None:
    import torch

    if torch.cuda.is_available():  # after an OOM: hand cached blocks back before going on
        torch.cuda.empty_cache()


# --- process entry -------------------------------------------------------------------------------------
def launch_args(spec: ModelSpec, config: EngineConfig, input_address: str, output_address: str) -> list[str]:
    """The command line that starts a core (the client runs it with the same interpreter)."""
    cfg = asdict(config)
    return [sys.executable, "-m", "adsa_core.engine", "--spec", json.dumps(asdict(spec)),
            "--config", json.dumps(cfg), "--input", input_address, "--output", output_address,
            "--parent-pid", str(os.getpid())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adsa_core.engine",
                                description="adsa-serve's engine-core process (started by the server)")
    p.add_argument("--spec", required=True, help="ModelSpec as JSON")
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    p.add_argument("--input", required=True, help="zmq address the client pushes requests to")
    p.add_argument("--output", required=True, help="zmq address the core pushes events to")
    p.add_argument("--parent-pid", type=int, required=True, help="the API process: the core exits once it is gone")
    a = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API process decides when the core stops
        signal.signal(sig, signal.SIG_IGN)
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(os.environ.get("ADSA_LOG_FORMAT", "text")))  # as the server's lines
    logging.basicConfig(level=os.environ.get("ADSA_ENGINE_LOG_LEVEL", "INFO").upper(), handlers=[handler])
    threading.Thread(target=_exit_when_orphaned, args=(a.parent_pid, socket_dir(a.input)), name="adsa-orphan-watch",
                     daemon=True).start()
    cfg = json.loads(a.config)
    config = EngineConfig(**{**cfg, "default_cache": CacheConfig(**cfg["default_cache"])})
    ctx = zmq.Context()
    outbox = Outbox(ctx, a.output)
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(a.input)
    try:
        models = load_models(ModelSpec(**json.loads(a.spec)))
        core = EngineCore(models, config, outbox)
        if fault := os.environ.get("ADSA_FAULT_REQUEST_ID"):  # tests: requests whose id contains it fail mid-run
            core.engine.fault_hook = lambda rid: _inject_fault(rid, fault)
        if step_fault := os.environ.get("ADSA_FAULT_STEP_REQUEST_ID"):  # tests: whole steps fail while it runs
            core.engine.step = _failing_steps(core.engine, step_fault)  # type: ignore[method-assign]
        warmup_s = core.warm_up()
    except ConfigError as e:  # settings that cannot work with this model or machine: the user's to fix, no traceback
        log.error("engine core failed to start: %s", e)
        outbox.send({"t": "fatal", "error": str(e), "config": True})
        return 2
    except BaseException as e:  # noqa: BLE001 - reported to the client, then the process ends
        log.exception("engine core failed to start")
        outbox.send({"t": "fatal", "error": f"{type(e).__name__}: {e}"})
        return 1
    outbox.send({"t": "ready", "info": asdict(model_info(models, core.engine)), "warmup_s": warmup_s})
    try:
        core.run(inbox)
    finally:
        core.close()
        ctx.destroy(linger=2000)
    return 0


def socket_dir(address: str) -> Path | None:
    """The folder of a socket address that ProcessEngineClient made (ipc://<tmp>/adsa-ipc-*/in); None for others."""
    folder = Path(address.removeprefix("ipc://")).parent
    return folder if address.startswith("ipc://") and folder.name.startswith(IPC_DIR_PREFIX) else None


def _exit_when_orphaned(parent: int, sockets: Path | None) -> None:
    """End the process once `parent` (the API process, passed by pid: it may be gone before this starts) is no
    longer its parent. Nothing is left to send results to, and SIGTERM is ignored, so this is how a core whose
    server failed to start (a port in use) or was killed ends, also in the middle of loading or warm-up. A
    killed server could not remove its socket folder: the core does."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    log.error("the API process (pid %d) is gone: exiting", parent)
    if sockets is not None:
        shutil.rmtree(sockets, ignore_errors=True)
    os._exit(1)


def _inject_fault(rid: str, marker: str) -> None:
    if marker in rid:
        raise RuntimeError(f"injected fault for {rid}")


def _failing_steps(engine: Engine, marker: str) -> Callable[[], None]:
    """Test hook: engine.step, raising after every step whose batch holds a request with `marker` in its id
    (as a CUDA OOM would): the core must fail that batch only."""
    step = engine.step

    def failing_step() -> None:
        step()
        if any(marker in item.request_id for item in engine.scheduler.running):  # type: ignore[attr-defined]
            raise RuntimeError("injected step failure")

    return failing_step

