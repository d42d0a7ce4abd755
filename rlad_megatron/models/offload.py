"""A frozen model's parameters in host memory outside the phase that uses them (``teacher.offload``).

    offload = ParameterOffload(teacher_model, device)   # parameters move to host memory now
    with offload.resident():                             # back on the device for scoring
        ...
    offload.copy_s                                       # seconds spent copying, both ways

The host copy is pinned when the device is a GPU, so the copies run at full PCIe/NVLink-C2C
bandwidth. Off the device each parameter's data is an empty tensor: its device memory is released
to the allocator (and :meth:`device_bytes` is 0), which is what lets the student's update and
optimizer step run without the teacher's weights. The values come back bit for bit. Only
parameters move; buffers (rotary frequencies) are small and stay.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class ParameterOffload:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.params = [p for p in model.parameters()]
        pin = device.type == "cuda"
        self.host = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self.params]
        self.on_device = True
        self.copy_s = 0.0
        self.offload()

    def offload(self) -> None:
        if not self.on_device:
            return
        t0 = time.perf_counter()
        for p, h in zip(self.params, self.host):
            if p.data.data_ptr() != h.data_ptr():  # on CPU the resident data may be the host copy itself
                h.copy_(p.data, non_blocking=True)
        self._sync()
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        self.on_device = False
        self.copy_s += time.perf_counter() - t0

    def onload(self) -> None:
        if self.on_device:
            return
        t0 = time.perf_counter()
        for p, h in zip(self.params, self.host):
            p.data = h.to(self.device, non_blocking=True)
        self._sync()
        self.on_device = True
        self.copy_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        self.onload()
        try:
            yield
        finally:
            self.offload()

    def device_bytes(self) -> int:
        """Bytes of parameter data currently held on the device."""
        return sum(p.data.numel() * p.data.element_size() for p in self.params)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
