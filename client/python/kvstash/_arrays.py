"""The memory the package reads blocks from and writes them into: numpy arrays, objects with
the buffer protocol, and torch tensors on the CPU or a CUDA device. Internal to the package.

Nothing is copied that need not be: a contiguous host array is handed to libkvstash by its
address, a CUDA tensor is read and written by the daemon in place (CUDA IPC, _ipc.py), or
copied once, by the GPU's copy engine, between its device memory and the bytes the call
moves (the shared-memory region, or a host staging buffer on the gRPC path), or decoded
straight into it (libkvstash_cuda). Elements are 2 bytes (fp16, or bf16
bits: numpy holds bf16 as uint16/int16). torch is imported only when a tensor is passed.
"""
from typing import Optional, Tuple

import numpy as np


def is_tensor(x) -> bool:
    return hasattr(x, "is_cuda") and hasattr(x, "data_ptr")


def _u8(t):
    """A flat uint8 view of a contiguous tensor."""
    import torch
    return t.reshape(-1).view(torch.uint8)


class Src:
    """A block to store: host bytes (`host` is a contiguous numpy array), or a CUDA tensor
    (`tensor`, contiguous: a copy of a strided one; `given`, the tensor as passed)."""

    def __init__(self, data, what: str = "data"):
        self.tensor = self.given = None
        if is_tensor(data):
            if data.element_size() != 2:
                raise TypeError(f"kvstash: {what}: KV tensors hold 2-byte elements (fp16 or "
                                f"bf16), got {data.dtype}")
            t = data.contiguous()
            if t.is_cuda:
                self.tensor, self.given, self.host, self.nbytes = t, data, None, t.numel() * 2
                return
            data = t.view(_int16()).numpy()
        a = np.ascontiguousarray(np.asarray(data))  # no copy when already contiguous
        if a.dtype.itemsize != 2:
            raise TypeError(f"kvstash: {what}: KV arrays hold 2-byte elements (fp16 or bf16 "
                            f"bits), got {a.dtype}")
        self.host, self.nbytes = a, a.nbytes

    @property
    def cuda(self) -> bool:
        return self.tensor is not None

    def host_array(self) -> np.ndarray:
        """The bytes in host memory (a device-to-host copy for a CUDA tensor)."""
        if self.host is None:
            self.host = _u8(self.tensor).cpu().numpy()
        return self.host

    def copy_to(self, view: np.ndarray):
        """Copies the block into view (host uint8, nbytes long): the region's slot."""
        if self.tensor is not None:
            import torch
            torch.from_numpy(view).copy_(_u8(self.tensor))
        else:
            view[:] = self.host.reshape(-1).view(np.uint8)


def _int16():
    import torch
    return torch.int16


class Dst:
    """Where a fetched block goes: a contiguous host array or CPU tensor (written in place by
    libkvstash at `ptr`), or a CUDA tensor (`cuda`; `ptr` is its device address)."""

    def __init__(self, obj, what: str, need: int):
        self.obj, self.what = obj, what
        if is_tensor(obj):
            if obj.element_size() != 2:
                raise TypeError(f"kvstash: {what}: a {obj.dtype} tensor; blocks are fp16 or "
                                f"bf16 (2-byte elements)")
            if not obj.is_contiguous():
                raise ValueError(f"kvstash: {what} must be contiguous (a block is written "
                                 f"into it in place)")
            self.cuda = bool(obj.is_cuda)
            self.ptr, self.nbytes = obj.data_ptr(), obj.numel() * 2
        else:
            if not isinstance(obj, np.ndarray):
                raise TypeError(f"kvstash: {what}: a numpy array or torch tensor, got "
                                f"{type(obj).__name__}")
            if not obj.flags.c_contiguous or not obj.flags.writeable:
                raise ValueError(f"kvstash: {what} must be C-contiguous and writeable")
            if obj.dtype.itemsize != 2:
                raise TypeError(f"kvstash: {what}: a {obj.dtype} array; blocks are fp16 or bf16 "
                                f"bits (2-byte elements)")
            self.cuda = False
            self.ptr, self.nbytes = obj.ctypes.data, obj.nbytes
        if self.nbytes < need:
            raise ValueError(f"kvstash: {what} holds {self.nbytes} bytes, a block needs {need}")

    def fill(self, src: np.ndarray):
        """Copies src (host uint8) to the start of the destination; for a CUDA tensor the copy
        is queued on torch's current stream (non-blocking only from pinned memory: the
        caller synchronizes before src is reused)."""
        if is_tensor(self.obj):
            import torch
            _u8(self.obj)[:src.nbytes].copy_(torch.from_numpy(src), non_blocking=self.cuda)
        else:
            self.obj.reshape(-1).view(np.uint8)[:src.nbytes] = src

    def shaped(self, nbytes: int, shape: Tuple[int, ...]):
        """The first nbytes of the destination as an array or tensor of `shape`."""
        return self.obj.reshape(-1)[: nbytes // 2].reshape(shape)


def layer_range(layers, n_layers: int, what: str = "layers") -> Tuple[int, int]:
    """layers (None: all; an int: one layer; a (begin, end) pair or a range of step 1) as a
    checked half-open range [begin, end)."""
    if layers is None:
        return 0, n_layers
    if isinstance(layers, int):
        b, e = layers, layers + 1
    elif isinstance(layers, range):
        if layers.step != 1:
            raise ValueError(f"kvstash: {what}: a range of step 1, got {layers}")
        b, e = layers.start, layers.stop
    else:
        try:
            b, e = layers
        except (TypeError, ValueError):
            raise TypeError(f"kvstash: {what}: an int, a (begin, end) pair or a range, got "
                            f"{layers!r}") from None
    if not 0 <= b < e <= n_layers:
        raise ValueError(f"kvstash: {what} [{b}, {e}) is not a non-empty range within the "
                         f"namespace's {n_layers} layers")
    return b, e


def cuda_stream_ptr(device_obj) -> Optional[int]:
    """torch's current CUDA stream on the tensor's device, as a cudaStream_t address."""
    import torch
    return torch.cuda.current_stream(device_obj.device).cuda_stream
