"""Image stage: VQ decode beside the decode loop, driven by the loop itself.

Finished requests are decoded together, in chunks of `chunk` images so the decoder's activations never
spike memory, on their own CUDA stream, so decoding overlaps the next token steps. Every chunk is padded
to the same static shape: a convolution's arithmetic can depend on the batch shape, never on the
neighbours' values, so an image's pixels depend on its own tokens only (tests/engine/test_imaging.py).

No thread: the engine calls `poll()` every step. It hands out the pixels of chunks whose copy to pinned
memory has completed (an event query, never a wait) and launches the next chunk on the image stream. A
second Python thread would share the loop's GIL: beside a loop that never blocks it starves, and finished
images reach clients late (docs/PERFORMANCE.md, run 17). On a CPU each chunk is decoded when launched.

A chunk costs the same GPU time however few of its images are real. While requests wait for the batch
(the GPU is the bottleneck) the stage launches only full chunks, or a partial one whose oldest image has
waited MAX_WAIT_S; otherwise it launches what it has at once (latency first).

The stage hands out uint8 pixels; PNG encoding happens in the engine client's worker threads, on
neither the engine loop nor the HTTP event loop (`encode_png`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..images import png_bytes, to_pil, uint8_pixels
from ..model.vq import VQModel
from .request import Finished, PartialImage, RequestFailed, RequestStats

log = logging.getLogger(__name__)
Sink = Callable[[object], None]
MAX_IN_FLIGHT = 2  # chunks (and, apart, previews) queued on the image stream at once: one decoding, one next
MAX_WAIT_S = 0.5  # a saturated engine still launches a partial chunk whose oldest image waited this long


@dataclass
class DoneImage:
    sink: Sink
    codes: torch.Tensor  # (block_size,) on the engine's device (a private copy)
    stats: RequestStats
    logprobs: torch.Tensor | None


@dataclass
class Preview:
    sink: Sink
    codes: torch.Tensor  # (block_size,) a private device copy, unfinished rows zeroed
    tokens_done: int
    rows_done: int
    px: int  # completed pixel rows


@dataclass
class _Job:
    """A launched decode: its outputs are valid on the host once `ready` has completed."""

    images: list[DoneImage] | Preview  # what it decodes (holding the device codes alive until then)
    codes: torch.Tensor | None  # (n, block_size) int64 on the host (pinned on a GPU); None for a preview
    pixels: torch.Tensor | None  # (n, H, W, 3) uint8 on the host; None without a VQ decoder
    ready: torch.cuda.Event | None  # recorded on the image stream after the copies; None on a CPU


def encode_png(pixels: torch.Tensor) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; fast compression: serving latency beats a few % of bytes."""
    return png_bytes(to_pil(pixels[None])[0], compress_level=1)


# EngineConfig.vq_autotune: Inductor's max-autotune, without CUDA graphs (the decode runs on its own stream,
# outside the steps' graphs)
VQ_AUTOTUNE_MODE = "max-autotune-no-cudagraphs"


def vq_compile_mode(vq: VQModel | None, device: torch.device, compiled: bool, autotune: bool) -> str | None:
    """torch.compile's mode for the VQ decoder: None where it runs eager (no decoder, a CPU, compile off)."""
    if vq is None or not compiled or device.type != "cuda":
        return None
    return VQ_AUTOTUNE_MODE if autotune else "default"


def vq_decoder(vq: VQModel | None, mode: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The VQ decode the image stage calls: (n, block_size) codes -> (n, 3, H, W) pixels in [-1, 1].

    Compiled (a `mode`, on a GPU): GroupNorm + swish fused, ~2x faster and less memory per chunk on an H100
    (tools/bench_vq_decode.py); one static chunk shape either way."""
    if vq is None or mode is None:
        return vq and vq.decode_code
    return torch.compile(vq.decode_code, dynamic=False, mode=mode)


class ImageStage:
    def __init__(self, vq: VQModel | None, device: torch.device, chunk: int | None, compile_decode: bool = False,
                 autotune: bool = False, on_outcome: Callable[[bool], None] = lambda ok: None):
        self.vq = vq
        self.on_outcome = on_outcome  # once per finished image: True delivered, False failed (the engine's counts)
        self.device = device
        self.chunk = chunk or (16 if device.type == "cuda" else 1)
        self.compile_mode = vq_compile_mode(vq, device, compile_decode, autotune)  # None: eager
        self._decode = vq_decoder(vq, self.compile_mode)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: deque[tuple[float, DoneImage]] = deque()  # finished, not launched: (time.monotonic(), image)
        self.chunks_launched = 0  # decodes of finished images (their fill: images / chunks)
        # previews are best effort: one queued per request (the latest), none once its image is finished
        self.previews: dict[Sink, Preview] = {}
        self.in_flight: deque[_Job] = deque()  # launched, in launch order

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.previews or self.in_flight)

    @torch.no_grad()
    def warm_up(self, block_size: int) -> None:
        """Decode one chunk now, so the first finished images never wait for the decoder's compile."""
        if self.vq is not None:
            self.decode(torch.zeros(1, block_size, dtype=torch.long, device=self.device))

    def finish(self, done: list[DoneImage]) -> None:
        now = time.monotonic()
        self.pending.extend((now, d) for d in done)
        for d in done:  # a preview must not arrive after its image
            self.previews.pop(d.sink, None)

    def preview(self, preview: Preview) -> None:
        if self.vq is not None:
            self.previews[preview.sink] = preview

    def poll(self, wait: bool = False, saturated: bool = False) -> None:
        """Deliver completed chunks (all of them if `wait`, blocking), then launch what is pending: only full
        chunks while `saturated` (requests wait for the batch), unless the oldest image waited MAX_WAIT_S."""
        while self.in_flight and (wait or _done(self.in_flight[0].ready)):
            self._deliver(self.in_flight.popleft())
        previews = sum(isinstance(job.images, Preview) for job in self.in_flight)
        # finished images first: previews never hold them back
        while self.pending and len(self.in_flight) - previews < MAX_IN_FLIGHT:
            if saturated and len(self.pending) < self.chunk and time.monotonic() - self.pending[0][0] < MAX_WAIT_S:
                break
            chunk = [self.pending.popleft()[1] for _ in range(min(self.chunk, len(self.pending)))]
            self.chunks_launched += 1
            self._launch(chunk)
        while self.previews and previews < MAX_IN_FLIGHT:
            sink = next(iter(self.previews))
            self._launch(self.previews.pop(sink))
            previews += 1

    def drain(self) -> None:
        """Decode and deliver everything queued (waits for the GPU)."""
        while self.busy:
            self.poll(wait=True)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, block_size) codes -> (n, H, W, 3) uint8 on the codes' device, `chunk` images per call, each call
        padded to `chunk` images (one static shape: the same pixels for an image whatever finishes beside it)."""
        out = []
        for c in codes.split(self.chunk):
            n = len(c)
            padded = torch.cat([c, c.new_zeros(self.chunk - n, c.shape[1])]) if n < self.chunk else c
            out.append(uint8_pixels(self._decode(padded)[:n]))
        return torch.cat(out)

    @torch.no_grad()
    def _launch(self, work: list[DoneImage] | Preview) -> None:
        """Queue one chunk (or a preview) on the image stream, after everything the loop queued so far (the
        steps that wrote its codes), and the copies of its results to the host behind it."""
        try:
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            codes: torch.Tensor | None
            pixels: torch.Tensor | None
            ready = None
            with torch.cuda.stream(self.stream):  # None (a CPU): no-op
                if isinstance(work, Preview):  # eager, one image: only a preview
                    codes, pixels = None, uint8_pixels(self.vq.decode_code(work.codes[None]))[0, : work.px]
                else:
                    codes = torch.stack([d.codes for d in work])  # (n, block_size)
                    pixels = self.decode(codes) if self.vq is not None else None
                codes, pixels = _to_host(codes), _to_host(pixels)
                if self.stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(self.stream)
        except Exception:  # noqa: BLE001 - a decode failure fails these images, not the engine
            self._failed(work)
            return
        self.in_flight.append(_Job(work, codes, pixels, ready))

    def _deliver(self, job: _Job) -> None:
        try:
            if job.ready is not None:
                job.ready.synchronize()  # returns at once unless poll(wait=True)
        except Exception:  # noqa: BLE001 - an asynchronous CUDA error surfaces here
            self._failed(job.images)
            return
        if isinstance(job.images, Preview):
            p = job.images
            p.sink(PartialImage(p.tokens_done, p.rows_done, job.pixels))
            return
        assert job.codes is not None  # a chunk of finished images always has its codes
        for i, d in enumerate(job.images):
            pixels = job.pixels[i] if job.pixels is not None else None
            d.sink(Finished(job.codes[i], pixels, d.stats, d.logprobs))
            self.on_outcome(True)

    def _failed(self, work: list[DoneImage] | Preview) -> None:
        if isinstance(work, Preview):  # a failed preview is skipped; the final image still comes
            log.exception("preview decode failed")
            return
        log.exception("image decode failed")
        for d in work:
            d.sink(RequestFailed("image decode failed"))
            self.on_outcome(False)

    def close(self) -> None:
        self.drain()  # finished images still go out


def _done(ev: torch.cuda.Event | None) -> bool:
    return ev is None or ev.query()


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """An asynchronous copy into pinned memory on a GPU (valid once the stream reaches it)."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)

