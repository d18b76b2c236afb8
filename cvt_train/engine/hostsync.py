"""Counting host-device synchronisations from outside the code that makes them.

A host read of a device value (`.item()`, `bool(t)`, `float(t)`, `int(t)`, `if t:`) waits for every kernel queued
before it: the GPU runs dry until the Python side queues more work. All of them go through one ATen op,
`aten._local_scalar_dense`, and so do they on CPU, which is how tests bound them on a machine with no GPU.
A copy of a CUDA tensor to the host (`.cpu()`, `.tolist()`, `.numpy()`) is counted too, and, since on CPU
`.tolist()` and `.numpy()` read memory without any ATen op, those calls are counted on CPU tensors (run the data
pipeline in DataLoader workers to keep its reads of host tensors out of the count). On CUDA,
`torch.cuda.set_sync_debug_mode` sees the same reads (but not the waits of `torch.distributed`).
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_COPIES = (aten._to_copy.default, aten.copy_.default)


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads: ...` then `reads.count`; `reads.where` keeps the innermost frames of each read
    in cvt_train (or the caller's code) when `trace=True`, to find where a new sync came from."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.count, self.trace, self.where = 0, trace, []
        self._patched = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            real = self._patched[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(real))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._patched.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)

    def _counting(self, real):
        def read(tensor, *args, **kwargs):
            if tensor.device.type == "cpu":  # (a CUDA tensor's copy to the host is counted below)
                self._record()
            return real(tensor, *args, **kwargs)

        return read

    def _record(self) -> None:
        self.count += 1
        if self.trace:
            frames = [f for f in traceback.extract_stack()[:-2] if "torch/" not in f.filename]
            self.where.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[-3:][::-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default or (func in _COPIES and _device_to_host(func, args, kwargs)):
            self._record()
        return func(*args, **kwargs)


def _device_to_host(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    dst, src = args[0], args[1]
    return src.device.type != "cpu" and dst.device.type == "cpu"
