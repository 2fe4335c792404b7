"""The REAL daemon (`python -m server`: uvicorn + the real engine-core process) in a subprocess on 127.0.0.1,
with a tiny random-weight GPT and the small VQ tokenizer from tests/data/llamagen, so tests
exercise real HTTP, batching and KV accounting in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "tests" / "data" / "llamagen"
API_KEY = "test-key-1"

# A 2-layer GPT over an 8x8 token grid (64 tokens, 32 px images) with random weights; the VQ is the
# shared small-width checkpoint (codebook 64, downsample 4).
TINY_GPT = {
    "dim": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 64,
    "block_size": 64,
    "num_classes": 10,
    "model_type": "c2i",
}
TINY_VQ = {
    "codebook_size": 64,
    "codebook_embed_dim": 8,
    "encoder_ch_mult": [1, 1, 2],
    "decoder_ch_mult": [1, 1, 2],
    "z_channels": 32,
    "ch": 32,
}


CPU_ENV = {
    "ADSA_DEVICE": "cpu",
    # one thread: the test machine has 2 cores shared by two servers and pytest, and OpenMP
    # spinning under oversubscription makes a tiny model ~20x slower
    "OMP_NUM_THREADS": "1",
}


def tiny_model_env() -> dict[str, str]:
    assert (TESTDATA / "vq.pt").is_file(), f"test vectors not found at {TESTDATA}"
    return {
        "ADSA_GPT_CONFIG": json.dumps(TINY_GPT),
        "ADSA_VQ_CKPT": str(TESTDATA / "vq.pt"),
        "ADSA_VQ_CONFIG": json.dumps(TINY_VQ),
        **CPU_ENV,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m server` in a subprocess; logs go to a temp file shown when a test fails."""

    def __init__(self, name: str, env: dict[str, str], model_env: dict[str, str] | None = None):
        """model_env: the model's variables; None: the tiny random model. `CPU_ENV` alone serves the
        embedded emoji demo model."""
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, self.log_path = tempfile.mkstemp(prefix=f"adsa-{name}-", suffix=".log")
        self.log = os.fdopen(fd, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ADSA_")}
        full_env.update(tiny_model_env() if model_env is None else model_env)
        full_env.update(env)
        full_env.update({"ADSA_HOST": "127.0.0.1", "ADSA_PORT": str(self.port), "PYTHONPATH": str(REPO)})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server"], cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not ready after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-6000:]

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} of one scrape."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log_path)
