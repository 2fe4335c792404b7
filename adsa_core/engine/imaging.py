"""Image stage: VQ decode off the decode loop.

Finished requests of one engine step are decoded together, in chunks of `chunk` images so the
decoder's activations never spike memory, on their own CUDA stream and thread, so decoding overlaps
the next token steps. Every chunk is padded to the same static shape: a convolution's arithmetic
can depend on the batch shape, never on the neighbours' values, so an image's pixels depend on its
own tokens only (tests/engine/test_imaging.py). The token buffer is read through a device-side copy
ordered after the step that produced it, so the engine never waits for the GPU here.

The stage hands out uint8 pixels; PNG encoding happens in the engine client's worker threads, on
neither the engine loop nor the HTTP event loop (`encode_png`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..images import png_bytes, to_pil, to_uint8
from ..loading import limit_cpu_threads
from ..model.vq import VQModel
from .request import Finished, PartialImage, RequestFailed, RequestStats

log = logging.getLogger(__name__)
Sink = Callable[[object], None]


@dataclass
class DoneImage:
    sink: Sink
    codes: torch.Tensor  # (block_size,) on the engine's device (a private copy)
    stats: RequestStats
    logprobs: torch.Tensor | None


def encode_png(pixels: torch.Tensor) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; fast compression: serving latency beats a few % of bytes."""
    return png_bytes(to_pil(pixels[None])[0], compress_level=1)


class ImageStage:
    def __init__(self, vq: VQModel | None, device: torch.device, chunk: int | None, compile_decode: bool = False,
                 gpu_lock: threading.Lock | None = None):
        self.vq = vq
        self.gpu_lock = gpu_lock or threading.Lock()  # shared with ModelRunner's graph capture
        self.device = device
        self.chunk = chunk or (16 if device.type == "cuda" else 1)
        # compiled VQ decode (GPU): GroupNorm + swish fused, ~2x faster and less memory per chunk on
        # an H100 (tools/bench_vq_decode.py); one static chunk shape either way
        compiled = vq is not None and compile_decode and device.type == "cuda"
        self._decode = torch.compile(vq.decode_code, dynamic=False) if compiled else (vq and vq.decode_code)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adsa-vq",
                                         initializer=limit_cpu_threads if device.type == "cpu" else None)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @torch.no_grad()
    def warm_up(self, block_size: int) -> None:
        """Decode one chunk now, so the first finished images never wait for the decoder's compile."""
        if self.vq is not None:
            with self._on_stream(self._ready_event()):
                self.decode(torch.zeros(1, block_size, dtype=torch.long, device=self.device))

    def _ready_event(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def finish(self, done: list[DoneImage]) -> None:
        if done:
            self.worker.submit(self._finish, done, self._ready_event())

    def preview(self, sink: Sink, codes: torch.Tensor, tokens_done: int, rows_done: int, px: int) -> None:
        """codes: a private device copy with the unfinished rows zeroed; px: completed pixel rows."""
        if self.vq is not None:
            self.worker.submit(self._preview, sink, codes, tokens_done, rows_done, px, self._ready_event())

    @contextlib.contextmanager
    def _on_stream(self, ready: torch.cuda.Event | None):
        """Run on the image stream, after the engine step that produced the tokens, and never
        while the engine captures a CUDA graph: a capture makes other threads' CUDA calls fail."""
        with self.gpu_lock:
            if self.stream is None:
                yield
                return
            self.stream.wait_event(ready)
            with torch.cuda.stream(self.stream):
                yield

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, block_size) codes -> (n, H, W, 3) uint8 on the CPU, `chunk` images per call, each call padded to
        `chunk` images (one static shape: the same pixels for an image whatever finishes beside it)."""
        out = []
        for c in codes.split(self.chunk):
            n = len(c)
            padded = torch.cat([c, c.new_zeros(self.chunk - n, c.shape[1])]) if n < self.chunk else c
            out.append(to_uint8(self._decode(padded)[:n]))
        return torch.cat(out)

    @torch.no_grad()
    def _finish(self, done: list[DoneImage], ready: torch.cuda.Event | None) -> None:
        try:
            with self._on_stream(ready):
                codes = torch.stack([d.codes for d in done])  # (n, block_size)
                pixels = self.decode(codes) if self.vq is not None else None  # (n, H, W, 3) uint8 on the CPU
                codes = codes.cpu()
        except Exception:  # noqa: BLE001 - a decode failure fails these images, not the engine
            log.exception("image decode failed")
            for d in done:
                d.sink(RequestFailed("image decode failed"))
            return
        for i, d in enumerate(done):
            d.sink(Finished(codes[i], pixels[i] if pixels is not None else None, d.stats, d.logprobs))

    @torch.no_grad()
    def _preview(self, sink: Sink, codes: torch.Tensor, tokens_done: int, rows_done: int, px: int,
                 ready: torch.cuda.Event | None) -> None:
        try:
            with self._on_stream(ready):
                pixels = to_uint8(self.vq.decode_code(codes[None]))[0, :px]  # eager, one image: only a preview
            sink(PartialImage(tokens_done, rows_done, pixels))
        except Exception:  # noqa: BLE001 - a failed preview is skipped; the final image still comes
            log.exception("preview decode failed")

    def close(self) -> None:
        self.worker.shutdown(wait=True)
