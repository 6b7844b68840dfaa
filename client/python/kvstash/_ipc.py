"""CUDA IPC registrations (README "Python"): a CUDA tensor's memory made a region of a daemon
on this host whose GPU engine runs on the same GPU, so PutMany encodes straight from it and
GetMany decodes straight into it, GPU to GPU, with no host copy. Internal to the package.

A registration covers one torch storage (the memory tensors view). torch's
storage._share_cuda_() gives (device, handle, storage bytes, storage offset in bytes within
the cudaMalloc allocation, ref counter name, ref counter offset, event handle, event sync
required) — the tuple torch.multiprocessing.reductions.reduce_tensor sends, the same in
torch 1.13 and 2.x (torch/csrc/StorageSharing.cpp, THPStorage_shareCuda). Only the handle's
form changed: the 64 bytes of a cudaIpcMemHandle_t until torch wrote it through
CUDACachingAllocator::shareIpcHandle, which prefixes a version byte and a type byte ('c' for
a cudaMalloc block, then the 64 bytes; 'e' for an expandable segment, which has no
cudaIpcMemHandle_t and so cannot be registered here). kvs_region_create_ipc sends handle,
offset, bytes and the device's UUID to the daemon, which opens the handle on its engine.

Each registration holds a reference to its storage, so the memory stays allocated while the
daemon has it mapped, until the registration is closed: by Client.close(), or when more than
the Client's `ipc_registrations` are open (least recently used first; never one the current
call uses). _share_cuda_ also puts the storage behind a counter for a consumer process to
decrement (torch/csrc/CudaIPCTypes.cpp): a storage freed while it is above zero is kept in
limbo, never returned to torch's allocator. The daemon is no torch process, so closing a
registration decrements it here (_release_ipc_counter_cuda), as torch's rebuild_cuda_tensor
does for a storage it already holds.

Refusals are remembered: KVS_ENOTSUP (a daemon without a GPU engine, on another host, or
without a region socket) for the Client's life, KVS_EINVAL (memory of another GPU than the
engine's, or a handle the driver refuses) per device. Not thread-safe: Client calls it under
its region lock.
"""
import ctypes
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from . import _lib
from ._lib import lib

EINVAL, ENOTSUP = -30001, -30012
HANDLE_LEN, UUID_LEN = 64, 16  # sizeof(cudaIpcMemHandle_t), sizeof(cudaUUID_t)


class Unavailable(Exception):
    """The IPC path cannot take a call: `code` (KVS_E*) and `msg` say why. `caller`: the
    call's data is at fault (a host array among CUDA tensors, a strided tensor), not the
    daemon or torch."""

    def __init__(self, code: int, msg: str, caller: bool = False):
        super().__init__(msg)
        self.code, self.msg, self.caller = code, msg, caller


def cuda_ipc_handle(handle) -> Optional[bytes]:
    """The cudaIpcMemHandle_t in the handle _share_cuda_() gives, or None (an expandable
    segment's, or a form this package does not know)."""
    h = bytes(handle) if handle is not None else b""
    if len(h) == HANDLE_LEN:  # torch writing the bare cudaIpcMemHandle_t (1.13, early 2.x)
        return h
    if len(h) == 2 + HANDLE_LEN and h[1] == ord("c"):  # [version][type 'c'][handle]
        return h[2:]
    return None


_uuids: Dict[int, bytes] = {}  # device index -> UUID; a device's UUID does not change


def _uuid_from_torch(index: int) -> Optional[bytes]:
    """cudaDeviceProp.uuid through torch: get_device_properties(i).uuid is a _CUuuid whose
    .bytes are the 16 bytes (a list of ints) and whose str() is 8-4-4-4-12 hex; a build that
    has only the string (or a "GPU-" prefixed one) is parsed too."""
    import torch
    u = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if u is None:
        return None
    raw = getattr(u, "bytes", None)
    if raw is not None:
        try:
            b = bytes(raw)
            if len(b) == UUID_LEN:
                return b
        except (TypeError, ValueError):
            pass
    s = str(u)
    for prefix in ("GPU-", "MIG-"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    try:
        b = bytes.fromhex(s.replace("-", ""))
    except ValueError:
        return None
    return b if len(b) == UUID_LEN else None


def _uuid_from_driver(index: int) -> Optional[bytes]:
    """The UUID from the driver API (libcuda.so.1, cuDeviceGetUuid_v2 — what the runtime
    puts in cudaDeviceProp.uuid — or cuDeviceGetUuid): torch.cuda.cudart() offers neither
    cudaGetDeviceProperties nor cudaDeviceGetUuid, and the driver's calls take no struct
    whose layout changes between CUDA versions. Driver and runtime number devices alike
    (both honour CUDA_VISIBLE_DEVICES)."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, buf = ctypes.c_int(), (ctypes.c_uint8 * UUID_LEN)()
    get = getattr(cu, "cuDeviceGetUuid_v2", None) or getattr(cu, "cuDeviceGetUuid", None)
    if get is None or cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), index) or get(buf, dev):
        return None
    return bytes(buf)


def device_uuid(index: int) -> bytes:
    """The 16 raw bytes of CUDA device `index`'s UUID (torch's, else the driver's)."""
    u = _uuids.get(index)
    if u is None:
        u = _uuid_from_torch(index) or _uuid_from_driver(index)
        if u is None:
            raise Unavailable(ENOTSUP, f"the UUID of CUDA device {index} could not be read "
                                       f"(neither torch nor libcuda.so.1 gave it)")
        _uuids[index] = u
    return u


def storage_of(t):
    """The untyped storage tensor t views: untyped_storage() (torch 2.x), else
    storage().untyped() (1.13; _untyped() in builds before it was renamed)."""
    f = getattr(t, "untyped_storage", None)
    if f is not None:
        return f()
    s = t.storage()
    return s.untyped() if hasattr(s, "untyped") else s._untyped()


def _release_counter(counter):
    """Decrements torch's ref counter of one _share_cuda_() (see the module docstring)."""
    if counter and counter[0]:
        try:
            import torch
            torch.UntypedStorage._release_ipc_counter_cuda(*counter)
        except Exception:  # noqa: BLE001 - best effort, as torch's own consumers do
            pass


class _Reg:
    __slots__ = ("region", "storage", "device", "counter")

    def __init__(self, region, storage, device, counter):
        self.region, self.storage, self.device, self.counter = region, storage, device, counter


class Registry:
    """The Client's registrations, by storage (its data_ptr and size), least recently used
    first, and what the daemon refused."""

    def __init__(self, limit: int):
        self.limit = limit
        self.regs: "OrderedDict[Tuple[int, int], _Reg]" = OrderedDict()
        self.refused: Optional[str] = None   # the daemon's KVS_ENOTSUP message
        self.bad_devices: Dict[int, str] = {}  # device index -> the daemon's KVS_EINVAL message

    def __len__(self):
        return len(self.regs)

    def register(self, client, handle: bytes, offset: int, nbytes: int, uuid: bytes,
                 device: Optional[int] = None) -> ctypes.c_void_p:
        """kvs_region_create_ipc: the region, or Unavailable with the daemon's answer, which
        is remembered (KVS_ENOTSUP for good, KVS_EINVAL for `device`)."""
        if self.refused is not None:
            raise Unavailable(ENOTSUP, self.refused)
        if device is not None and device in self.bad_devices:
            raise Unavailable(EINVAL, self.bad_devices[device])
        r, err = ctypes.c_void_p(), _lib.Err()
        rc = lib.kvs_region_create_ipc(client, handle, offset, nbytes, uuid, ctypes.byref(r),
                                       ctypes.byref(err))
        if rc:
            msg = err.msg.decode(errors="replace")
            if rc == ENOTSUP:
                self.refused = msg
            elif rc == EINVAL and device is not None:
                self.bad_devices[device] = msg
            raise Unavailable(rc, msg)
        return r

    def _register_storage(self, client, st, device: int) -> _Reg:
        try:
            share = st._share_cuda_()
        except Exception as e:  # noqa: BLE001 - e.g. a storage received from another process
            raise Unavailable(ENOTSUP, f"torch cannot share this CUDA storage: {e}") from None
        dev, handle, nbytes, offset = share[:4]
        counter = tuple(share[4:6]) if len(share) >= 6 else None
        try:
            raw = cuda_ipc_handle(handle)
            if raw is None:
                raise Unavailable(ENOTSUP, "the tensor's memory has no cudaIpcMemHandle_t (an "
                                           "expandable segment: PYTORCH_CUDA_ALLOC_CONF="
                                           "expandable_segments:True)")
            region = self.register(client, raw, offset, nbytes, device_uuid(dev), device)
        except BaseException:
            _release_counter(counter)
            raise
        return _Reg(region, st, device, counter)

    def regions(self, client, tensors) -> List[Tuple[ctypes.c_void_p, int]]:
        """Per tensor (CUDA, contiguous), its storage's region (registered now or earlier)
        and the tensor's byte offset in it. Unavailable when one cannot be registered."""
        if self.refused is not None:
            raise Unavailable(ENOTSUP, self.refused)
        for t in tensors:
            if t.device.index in self.bad_devices:
                raise Unavailable(EINVAL, self.bad_devices[t.device.index])
        out, used = [], set()
        for t in tensors:
            st = storage_of(t)
            key = (st.data_ptr(), st.nbytes())
            reg = self.regs.get(key)
            if reg is None:
                reg = self.regs[key] = self._register_storage(client, st, t.device.index)
            else:
                self.regs.move_to_end(key)
            used.add(key)
            self.trim(used)
            out.append((reg.region, t.storage_offset() * t.element_size()))
        return out

    def trim(self, keep=()):
        """Closes the least recently used registrations over the limit, except those in
        keep (the current call's: the limit may be passed while one call needs more)."""
        for key in [k for k in self.regs if k not in keep][:max(0, len(self.regs) - self.limit)]:
            self._close(self.regs.pop(key))

    def close(self):
        """Closes every registration (the refusals stay remembered)."""
        while self.regs:
            self._close(self.regs.popitem(last=False)[1])

    @staticmethod
    def _close(reg: _Reg):
        lib.kvs_region_close(reg.region)
        _release_counter(reg.counter)
        reg.storage = reg.counter = None
