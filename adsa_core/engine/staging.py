"""Host-to-device copies that never wait for the GPU (the engine loop's only way to send values)."""

from __future__ import annotations

import torch


class Staging:
    """Host-to-device copies without a host sync: a copy from pageable memory waits for the GPU, so
    values go through a ring of pinned buffers, each reused only after its copy ran."""

    def __init__(self, device: torch.device, n: int = 32):
        self.device = device
        self.ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        if device.type == "cuda":
            self.ring = [(torch.empty(0, dtype=torch.uint8), None) for _ in range(n)]
        self.next = 0

    def copy(self, src: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """src (host) into dst on the device (a new tensor if None); returns it."""
        if self.device.type != "cuda":
            return src.to(self.device) if dst is None else dst.copy_(src)
        k = self.next = (self.next + 1) % len(self.ring)
        buf, ev = self.ring[k]
        if ev is not None:
            ev.synchronize()  # only waits if the GPU is a whole ring behind
        nbytes = src.numel() * src.element_size()
        if buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * buf.numel()), dtype=torch.uint8, pin_memory=True)
        staged = buf[:nbytes].view(src.dtype).view(src.shape).copy_(src)
        out = staged.to(self.device, non_blocking=True) if dst is None else dst.copy_(staged, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.ring[k] = (buf, ev)
        return out
