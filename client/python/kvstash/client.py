"""kvstash.Client: the Python face of libkvstash (see the package docstring)."""
import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _arrays, _ipc, _lib, paged
from ._arrays import Dst, Src
from ._lib import lib

# KVS_E* codes (gpu/base/err.h) -> (name, gRPC status name).
_CODES = {
    -30001: ("EINVAL", "INVALID_ARGUMENT"), -30002: ("ENOTFOUND", "NOT_FOUND"),
    -30003: ("EEXIST", "ALREADY_EXISTS"), -30004: ("ENOSPC", "RESOURCE_EXHAUSTED"),
    -30005: ("ENOMEM", "RESOURCE_EXHAUSTED"), -30006: ("E2BIG", "RESOURCE_EXHAUSTED"),
    -30007: ("EUNAUTH", "UNAUTHENTICATED"), -30008: ("EPERM", "PERMISSION_DENIED"),
    -30009: ("EUNAVAIL", "UNAVAILABLE"), -30010: ("EDATALOSS", "DATA_LOSS"),
    -30011: ("EINTERNAL", "INTERNAL"), -30012: ("ENOTSUP", "UNIMPLEMENTED"),
    -30013: ("ETIMEDOUT", "DEADLINE_EXCEEDED"), -30014: ("ECANCELED", "CANCELLED"),
    -30015: ("EIO", "INTERNAL"), -30016: ("EPROTO", "INTERNAL"),
}
_TIERS = {0: "none", 1: "gpu", 2: "host", 3: "disk"}
_DTYPES = {"fp16": 1, "bf16": 2}
ENOTFOUND, ENOTSUP, ENOSPC, E2BIG = -30002, -30012, -30004, -30006
_PATHS = ("auto", "ipc", "shm", "grpc")
_ROUTES = {None: 0, False: 1, True: 2}  # get_many(local_first=...) -> kvs_route


class _Calls:
    """The C calls a Client's methods make: one daemon's (kvs_client_*) or a cluster's
    (kvs_cluster_*), which share their signatures; picked once, so no method tells the two
    apart."""

    def __init__(self, kind: str):
        for verb in ("put", "get", "put_many", "get_many", "lookup", "exists", "delete",
                     "ns_create", "ns_drop", "ns_get"):
            setattr(self, verb, getattr(lib, f"kvs_{kind}_{verb}"))


_ONE, _CLUSTER = _Calls("client"), _Calls("cluster")
_log = logging.getLogger("kvstash")
_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}


def _event(ctx, level, line):
    """A sharded client's events (daemons down or back, the node set changing), from its
    threads, to the "kvstash" logger."""
    _log.log(_LEVELS.get(level, logging.DEBUG), "%s", line.decode(errors="replace"))


_EVENT = _lib.LogFn(_event)  # one for every Client: it must outlive their threads


class KvstashError(Exception):
    """A call failed. `code` is libkvstash's KVS_E* code, `status` the gRPC status class
    (e.g. "NOT_FOUND"), and the message is the daemon's (it names the field at fault)."""

    def __init__(self, code: int, message: str):
        self.code = code
        self.name, self.status = _CODES.get(code, ("E?", "UNKNOWN"))
        super().__init__(f"{self.status}: {message}")


def _check(rc: int, err: _lib.Err):
    if rc:
        raise KvstashError(rc, err.msg.decode(errors="replace"))


@dataclass
class Namespace:
    """A namespace's spec and usage (ListNamespaces)."""
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str
    key_codec: str
    value_codec: str
    durable: bool
    blocks: int
    stored_bytes: int
    raw_bytes: int
    block_bytes: int
    host_quota_bytes: int = 0
    # Fidelity (README "Namespace options"): error_sample None = the daemon's default.
    error_sample: Optional[float] = None
    max_rel_error: float = 0.0
    fallback_codec: str = ""
    # Precision demotion (README "Namespace options"): the host and disk tiers' codecs.
    host_codec: str = ""
    disk_codec: str = ""
    # Measured error since the daemon started: error_sample (the share measured now),
    # keys/values/logits as {"count", "mean", "max"}, checked, fallback_blocks,
    # fallback_keys, fallback_values.
    fidelity: dict = field(default_factory=dict)
    # Quotas of the GPU and disk tiers (0: none), as host_quota_bytes.
    gpu_quota_bytes: int = 0
    disk_quota_bytes: int = 0

    @property
    def token_bytes(self) -> int:
        """Raw bytes of one token of KV (all layers, K and V)."""
        return self.block_bytes // self.block_tokens

    @property
    def numpy_dtype(self):
        return np.float16 if self.dtype == "fp16" else np.uint16  # bf16: raw uint16 bits


@dataclass
class PutResult:
    tier: str
    encoded_bytes: int
    raw_bytes: int
    replaced: bool
    fallback: bool = False  # stored with the namespace's fallback codec (max_rel_error)


def _ns_of(info: _lib.NsInfo) -> Namespace:
    s, f = info.spec, info.fidelity
    err = lambda e: {"count": e.count, "mean": e.mean, "max": e.max}  # noqa: E731
    return Namespace(s.name.decode(), s.layers, s.kv_heads, s.head_dim, s.block_tokens,
                     {1: "fp16", 2: "bf16"}.get(s.dtype, "?"), s.key_codec.decode(),
                     s.value_codec.decode(), bool(s.durable), info.blocks, info.stored_bytes,
                     info.raw_bytes, info.block_bytes, s.host_quota,
                     s.error_sample if s.error_sample_set else None, s.max_rel_error,
                     s.fallback_codec.decode(), s.host_codec.decode(), s.disk_codec.decode(),
                     {"error_sample": f.error_sample, "keys": err(f.keys),
                      "values": err(f.values), "logits": err(f.logits), "checked": f.checked,
                      "fallback_blocks": f.fallback_blocks, "fallback_keys": f.fallback_keys,
                      "fallback_values": f.fallback_values},
                     gpu_quota_bytes=s.gpu_quota, disk_quota_bytes=s.disk_quota)


def _enc_cap(raw_bytes: int) -> int:
    """Room for one encoded block whose decoded form is raw_bytes: an encoded block is at most
    its raw bytes (codec none) plus a header and per-layer framing."""
    return raw_bytes + (raw_bytes >> 2) + 65536


def _keyed(item_type, keys):
    """A ctypes array of item_type (PutItem, GetItem), one per key (bytes, kept alive by the
    caller), their key fields set."""
    items = (item_type * len(keys))()
    for it, k in zip(items, keys):
        it.key = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p)
        it.key_len = len(k)
    return items


def _keybuf(key: Union[bytes, str]) -> bytes:
    k = key.encode() if isinstance(key, str) else bytes(key)
    if not 1 <= len(k) <= _lib.KEY_MAX:
        raise ValueError(f"kvstash: a key has 1..{_lib.KEY_MAX} bytes, got {len(k)}")
    return k


def _keys(keys: Sequence[Union[bytes, str]]):
    arr = (_lib.Key * len(keys))()
    for i, key in enumerate(keys):
        k = _keybuf(key)
        arr[i].len = len(k)
        ctypes.memmove(arr[i].bytes, k, len(k))
    return arr


class Client:
    """A connection to kvstashd (one gRPC channel; thread-safe), or to several (sharding).

        with kvstash.Client("127.0.0.1:50051") as c:
            c.create_namespace("llama", layers=32, kv_heads=8, head_dim=128, block_tokens=16,
                               key_codec="polarquant", value_codec="polarquant")
            c.put_many("llama", zip(keys, blocks))          # blocks: [L][2][t][H][D] arrays
            blocks = c.get_prefix("llama", keys)            # the leading present blocks

    Blocks are numpy arrays (fp16, or bf16 bits as uint16), buffer-protocol objects, or torch
    tensors on the CPU or a CUDA device. Batched calls take the fastest path the daemon and
    the data allow, and `last_path` names it:
      "ipc"    CUDA tensors (every block of put_many, every `out` of get_many), contiguous,
               with a daemon on this host whose GPU engine (`--gpu on`) runs on their GPU:
               the daemon encodes from and decodes into the tensors' memory through CUDA
               IPC, no host copy. Each tensor's storage is registered once and stays
               referenced (allocated) until close(), or until more than
               `ipc_registrations` are (least recently used first).
      "shm"    shared memory with a daemon on this host (a region registered once,
               `shared_memory_bytes` large); "grpc" the block bytes over gRPC otherwise.
      "+gpudecode"  (after shm or grpc) the blocks came encoded and were decoded on this
               process's GPU straight into the CUDA tensors given as `out` (libkvstash_cuda):
               `gpu_decode` "auto" does so for CUDA destinations of a compressing codec
               from a remote daemon, "on" for every CUDA destination (never by IPC then),
               "off" never (the daemon decodes).
    `path` "auto" picks as above, falling back from ipc to shm when the daemon or the data
    cannot take it (a daemon without a GPU engine is not asked again; memory of another GPU
    is not offered again). "ipc", "shm" or "grpc" take that path or raise KvstashError
    (UNIMPLEMENTED) saying why; "ipc" applies to calls with CUDA tensors (ValueError for a
    call mixing them with host arrays, or a strided tensor), others go as with "auto";
    "grpc" behaves as with a remote daemon. put() and get() of a CUDA tensor go through the
    batched calls when "ipc" may take them. Outside ipc, CUDA tensors are copied once by the
    GPU between device memory and the bytes the call moves.
    `connections` (1-16): TCP connections to each daemon; a batched get of 8 MiB or more
    over gRPC is split over them and received at once (for a remote worker: one connection
    carries 1-2 GB/s). Calls through shared memory or IPC gain nothing from more.

    Sharding (README "Sharding"): `target` as a list of targets, a comma-separated string,
    or "dns:///NAME:PORT" (every A/AAAA record of NAME, re-resolved every `resolve_ms`; a
    Kubernetes headless Service) spreads the keys over those daemons by rendezvous hashing;
    the same calls work, batches fan out to the daemons in parallel. A daemon that is down
    turns its keys into misses (None, like absent keys) and its puts into KvstashError
    UNAVAILABLE results, within the call's deadline; it is retried with backoff (`backoff_ms`,
    first and last wait). `local`: this node's own daemon ("unix:/run/kvstash.sock"), asked
    first by gets and given a copy of every put; `local_id`: its id in the ring
    ("10.0.0.7:50051"). nodes() and owner() show the placement; daemons going down or coming
    back and the node set changing are logged to the "kvstash" logger. Namespaces are
    created on every daemon; stats() and namespaces() are one daemon's business: open a
    Client on one of nodes(). Blocks are decoded by the daemons (gpu_decode "auto" does not
    apply and "on" is refused: codec state is learned per daemon).
    Paths of a sharded Client: "shm" is a region with the `local` daemon only (the other
    daemons' blocks move through its memory as bytes over gRPC; without `local`, "auto"
    takes grpc and path="shm" raises KvstashError). There is no "ipc": a CUDA IPC region
    reaches only the daemon it is registered with, and most keys' owners are others, so a
    sharded Client refuses path="ipc" (ValueError) and "auto" never tries IPC; CUDA tensors
    go through shm or grpc, copied once by the GPU.
    """

    def __init__(self, target: Union[str, Sequence[str]] = "127.0.0.1:50051",
                 token: Optional[str] = None,
                 timeout_ms: int = 30000, shared_memory_bytes: int = 256 << 20,
                 gpu_decode: str = "auto", token_file: Optional[str] = None,
                 tls_ca: Optional[str] = None, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, tls_server_name: Optional[str] = None,
                 path: str = "auto", ipc_registrations: int = 64,
                 local: Optional[str] = None, local_id: Optional[str] = None,
                 resolve_ms: int = 10000, backoff_ms: Tuple[int, int] = (100, 5000),
                 connections: int = 1):
        # TLS (README "TLS"): PEM file paths, read by libkvstash (errors name the option);
        # any of them turns TLS on; tls_cert and tls_key for mutual TLS.
        if token is not None and token_file is not None:
            raise ValueError("kvstash: give token or token_file, not both")
        if token_file is not None:  # the file's content, a trailing newline dropped
            with open(token_file, "rb") as f:
                token = f.read().decode().removesuffix("\n").removesuffix("\r")
            if not token:
                raise ValueError(f"kvstash: token_file '{token_file}' is empty")
        if gpu_decode not in ("auto", "on", "off"):
            raise ValueError(f"kvstash: gpu_decode must be 'auto', 'on' or 'off', got "
                             f"{gpu_decode!r}")
        if path not in _PATHS:
            raise ValueError(f"kvstash: path must be one of {', '.join(map(repr, _PATHS))}, "
                             f"got {path!r}")
        if path == "ipc" and gpu_decode == "on":
            raise ValueError("kvstash: path='ipc' has the daemon decode into CUDA tensors, "
                             "gpu_decode='on' this process: choose one")
        if not 1 <= connections <= 16:  # KVS_CONNECTIONS_MAX
            raise ValueError(f"kvstash: connections must be 1 to 16, got {connections}")
        if ipc_registrations < 1:
            raise ValueError(f"kvstash: ipc_registrations must be at least 1, got "
                             f"{ipc_registrations}")
        self._path = path
        self._ipc = _ipc.Registry(ipc_registrations)

        def pem(p):  # str or os.PathLike
            return str(p).encode() if p is not None else None
        if not isinstance(target, str):
            target = ",".join(target)
        self._cluster = (local is not None or "," in target or target.startswith("dns:"))
        if self._cluster and gpu_decode == "on":
            raise ValueError("kvstash: gpu_decode='on' needs one daemon (learned codec state "
                             "is per daemon); with several, the daemons decode")
        if self._cluster and path == "ipc":
            raise ValueError("kvstash: path='ipc' needs one daemon (a CUDA IPC region reaches "
                             "only the daemon it is registered with, not a key's owner); "
                             "a sharded Client moves CUDA tensors by shm or grpc")
        if self._cluster:  # "auto" never tries IPC (nor runs torch's _share_cuda_)
            self._ipc.refused = "a sharded Client does not use CUDA IPC"
        self._c = _CLUSTER if self._cluster else _ONE
        self._opts = _lib.ClientOpts(None if self._cluster else target.encode(),
                                     token.encode() if token else None,
                                     timeout_ms, 0, 0, pem(tls_ca), pem(tls_cert),
                                     pem(tls_key),
                                     tls_server_name.encode() if tls_server_name else None,
                                     connections)
        self._h = ctypes.c_void_p()
        err = _lib.Err()
        if self._cluster:
            self._copts = _lib.ClusterOpts(target.encode(), local.encode() if local else None,
                                           local_id.encode() if local_id else None, resolve_ms,
                                           backoff_ms[0], backoff_ms[1], 0, self._opts, _EVENT,
                                           None)
            _check(lib.kvs_cluster_open(ctypes.byref(self._copts), ctypes.byref(self._h),
                                        ctypes.byref(err)), err)
        else:
            _check(lib.kvs_client_connect(ctypes.byref(self._opts), ctypes.byref(self._h),
                                          ctypes.byref(err)), err)
        self._shm_bytes = shared_memory_bytes
        self._region = None      # kvs_region*, or False once the daemon said no
        self._region_why = ""    # what it said
        self._region_rc = 0      # and its code
        self._region_cuda = False  # the region is registered with CUDA (pinned) here
        # The region's bytes, the staging buffers and the GPU decoders serve one call at a
        # time (libkvstash_cuda's decoders are not thread-safe).
        self._region_lock = threading.Lock()
        self._gpu_decode = gpu_decode
        self._cuda_lib = None    # libkvstash_cuda, loaded on first use; False if it cannot be
        self._decoders = {}      # (namespace, device index) -> kvs_cuda_decoder*
        self._ns_cache = {}
        self._tls = threading.local()

    # ------------------------------------------------------------------ lifetime
    def close(self):
        """Closes the connection, the shared-memory region and the CUDA IPC registrations
        (their tensors are no longer referenced here). Idempotent."""
        self._ipc.close()
        for d in self._decoders.values():
            self._cuda_lib.kvs_cuda_decoder_destroy(d)
        self._decoders = {}
        if self._region:
            if self._region_cuda:
                import torch
                torch.cuda.cudart().cudaHostUnregister(lib.kvs_region_data(self._region))
                self._region_cuda = False
            lib.kvs_region_close(self._region)
        self._region = None
        if self._h:
            (lib.kvs_cluster_close if self._cluster else lib.kvs_client_close)(self._h)
            self._h = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def last_path(self) -> Optional[str]:
        """The path the last batched call of this thread took: "ipc", "shm" or "grpc", the
        latter two followed by "+gpudecode" when the blocks were decoded on this process's
        GPU."""
        return getattr(self._tls, "path", None)

    # ------------------------------------------------------------------ namespaces
    def create_namespace(self, name: str, layers: int, kv_heads: int, head_dim: int,
                         block_tokens: int, dtype: str = "fp16", key_codec: str = "none",
                         value_codec: str = "none", durable: bool = False,
                         keys_pre_rope: bool = False, seed: int = 0,
                         host_quota_bytes: int = 0, error_sample: Optional[float] = None,
                         max_rel_error: float = 0.0, fallback_codec: str = "",
                         gpu_quota_bytes: int = 0, disk_quota_bytes: int = 0,
                         host_codec: str = "", disk_codec: str = "") -> Namespace:
        """Creates a namespace (KvAdmin.CreateNamespace); see the README for codecs.
        host_quota_bytes: bytes of the host tier it may hold (0: no quota); over it, a Put
        evicts this namespace's own blocks, never another namespace's. gpu_quota_bytes,
        disk_quota_bytes: the same for the GPU tier (over it, Puts land in the host tier
        while its own GPU blocks are demoted) and the disk tier (its own oldest records are
        evicted; a durable namespace's Put over it is refused). error_sample: the
        share of Puts (0..1) whose encoded block the daemon decodes again and measures
        (Namespace.fidelity); None: the daemon's --error-sample. max_rel_error: check every
        Put, and store keys or values whose relative error passes it with fallback_codec
        (none, the default with a bound; fp8, kivi-2/3/4, polarquant). host_codec,
        disk_codec: precision demotion, the codec of the host and of the disk tier ("":
        blocks keep theirs); a block moving down (or Put straight into the host tier) has
        keys and values re-encoded with the tier's codec where it is smaller (the GPU tier's
        is key_codec/value_codec); not with max_rel_error."""
        if dtype not in _DTYPES:
            raise ValueError(f"kvstash: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        s = _lib.NsSpec(name.encode(), layers, kv_heads, head_dim, block_tokens,
                        _DTYPES[dtype], key_codec.encode(), value_codec.encode(),
                        keys_pre_rope, durable, seed, host_quota_bytes,
                        error_sample is not None, error_sample or 0.0, max_rel_error,
                        fallback_codec.encode(), gpu_quota_bytes, disk_quota_bytes,
                        host_codec.encode(), disk_codec.encode())
        info, err = _lib.NsInfo(), _lib.Err()
        _check(self._c.ns_create(self._h, ctypes.byref(s), ctypes.byref(info),
                                 ctypes.byref(err)), err)
        return _ns_of(info)

    def open_namespace(self, name: str, layers: int, kv_heads: int, head_dim: int,
                       block_tokens: int, dtype: str = "fp16", what: str = "this caller",
                       **create) -> Namespace:
        """The namespace `name`, created with this shape (and `create`'s other
        create_namespace arguments: codecs, quota...) if it does not exist yet, as engine
        workers do on start: a race with another worker creating it is fine. An existing
        namespace is used as it is if its shape matches; ValueError naming the fields
        otherwise (keys say nothing about the model: a shape mismatch means another one)."""
        want = (layers, kv_heads, head_dim, block_tokens, dtype)
        try:
            ns = self.namespace(name)
        except KvstashError as e:
            if e.status != "NOT_FOUND":
                raise
            try:
                ns = self.create_namespace(name, layers, kv_heads, head_dim, block_tokens,
                                           dtype=dtype, **create)
            except KvstashError as e2:
                if e2.status != "ALREADY_EXISTS":  # another worker made it first
                    raise
                ns = self.namespace(name)
        have = (ns.layers, ns.kv_heads, ns.head_dim, ns.block_tokens, ns.dtype)
        if have != want:
            raise ValueError(f"kvstash: namespace '{name}' holds (layers, kv_heads, head_dim, "
                             f"block_tokens, dtype) = {have}, {what} needs {want}")
        return ns

    def drop_namespace(self, name: str) -> int:
        """Drops a namespace and its blocks; returns how many blocks went."""
        n, err = ctypes.c_uint64(), _lib.Err()
        _check(self._c.ns_drop(self._h, name.encode(), ctypes.byref(n),
                               ctypes.byref(err)), err)
        self._ns_cache.pop(name, None)
        return n.value

    def namespace(self, name: str) -> Namespace:
        info, err = _lib.NsInfo(), _lib.Err()
        _check(self._c.ns_get(self._h, name.encode(), ctypes.byref(info),
                              ctypes.byref(err)), err)
        return _ns_of(info)

    def _one_daemon(self, what: str):
        if self._cluster:
            raise KvstashError(ENOTSUP, f"{what}: one daemon's; with several, open a Client on "
                                        f"one of nodes()")

    def namespaces(self) -> List[Namespace]:
        self._one_daemon("namespaces")
        p, n, err = ctypes.POINTER(_lib.NsInfo)(), ctypes.c_size_t(), _lib.Err()
        _check(lib.kvs_client_ns_list(self._h, ctypes.byref(p), ctypes.byref(n),
                                      ctypes.byref(err)), err)
        try:
            return [_ns_of(p[i]) for i in range(n.value)]
        finally:
            ctypes.CDLL(None).free(p)

    def _ns(self, name: str, fresh: bool = False) -> Namespace:
        """The namespace's spec, cached: another client may drop it and create it again
        with another shape, so callers that see sizes the cached spec does not explain ask
        again once (fresh=True) before they refuse or trust a result."""
        ns = None if fresh else self._ns_cache.get(name)
        if ns is None:
            ns = self._ns_cache[name] = self.namespace(name)
        return ns

    def _ns_fitting(self, name: str, sizes) -> Namespace:
        """The spec, fetched again once when one of the payload sizes is no whole number of
        its tokens (a stale cache; the size check then says what is wrong)."""
        n = self._ns(name)
        if any(s == 0 or s % n.token_bytes for s in sizes):
            n = self._ns(name, fresh=True)
        return n

    def _stale(self, n: Namespace, res, lb: int, le: int) -> bool:
        """A decoded block whose size the cached spec does not explain: the namespace was
        recreated with another shape since it was cached."""
        return res.bytes != res.tokens * n.token_bytes // n.layers * (le - lb)

    def _tokens(self, ns: Namespace, a: np.ndarray) -> int:
        if a.nbytes == 0 or a.nbytes % ns.token_bytes:
            raise ValueError(f"kvstash: {a.nbytes} bytes are not whole tokens of namespace "
                             f"'{ns.name}' ({ns.token_bytes} bytes per token: "
                             f"[{ns.layers}][2][t][{ns.kv_heads}][{ns.head_dim}])")
        return a.nbytes // ns.token_bytes

    # ------------------------------------------------------------------ one block
    def put(self, ns: str, key, data) -> PutResult:
        """Stores one block: data is [L][2][t][H][D] (any shape with those bytes) of the
        namespace's dtype, a host array or a CPU or CUDA tensor; t is taken from its size."""
        if self._ipc_may_take(data):
            res = self.put_many(ns, [(key, data)])[0]
            if isinstance(res, KvstashError):
                raise res
            return res
        a = Src(data).host_array()
        n = self._ns_fitting(ns, [a.nbytes])
        k = _keybuf(key)
        res, err = _lib.PutResult(), _lib.Err()
        _check(self._c.put(self._h, ns.encode(), k, len(k), self._tokens(n, a),
                           _DTYPES[n.dtype], a.ctypes.data, a.nbytes, ctypes.byref(res),
                           ctypes.byref(err)), err)
        return PutResult(_TIERS[res.tier], res.encoded_bytes, res.raw_bytes, res.replaced,
                         res.fallback)

    def get(self, ns: str, key, out=None, layers=None, _fresh: bool = False):
        """Fetches one block, decoded, as [L][2][t][H][D] (a numpy array, or a view of `out`:
        a contiguous array or CPU/CUDA tensor of at least the block's bytes). layers: an int,
        a (begin, end) pair or a range: only those layers, [end-begin][2][t][H][D].
        KvstashError NOT_FOUND if the key is absent."""
        n = self._ns(ns, fresh=_fresh)
        if layers is None and (out is None or isinstance(out, np.ndarray)):
            # The unary Get: one round trip, no GetMany stream set up (small blocks).
            dst = Dst(out if out is not None else np.empty(n.block_bytes // 2, n.numpy_dtype),
                      "out", n.block_bytes)
            k = _keybuf(key)
            res, err = _lib.GetResult(), _lib.Err()
            rc = self._c.get(self._h, ns.encode(), k, len(k), dst.ptr, dst.nbytes,
                             ctypes.byref(res), ctypes.byref(err))
            if not _fresh and out is None and (rc in (E2BIG, ENOSPC) or
                                               (rc == 0 and self._stale(n, res, 0, n.layers))):
                return self.get(ns, key, _fresh=True)  # the namespace changed shape
            _check(rc, err)
            return dst.shaped(res.bytes, (n.layers, 2, res.tokens, n.kv_heads, n.head_dim))
        got = self.get_many(ns, [key], layers=layers, out=None if out is None else [out])
        if got[0] is None:
            raise KvstashError(ENOTFOUND, f"key {_keybuf(key).hex()} is not in namespace "
                                          f"'{ns}'")
        return got[0]

    # ------------------------------------------------------------------ batches
    def _region_for(self, nbytes: int):
        """The shared-memory region if the daemon is on this host and one block of nbytes
        fits it, else None (KvstashError with path "shm"). Batches larger than the region
        go through it in windows."""
        if self._path == "grpc":
            return None
        if nbytes > self._shm_bytes:
            if self._path == "shm":
                raise KvstashError(ENOTSUP, f"path='shm': a block of {nbytes} bytes does not "
                                            f"fit shared_memory_bytes ({self._shm_bytes})")
            return None
        if self._region is None:
            # Sharded: a region with the local daemon (the others' blocks move through its
            # memory as bytes), none without one.
            owner = lib.kvs_cluster_local(self._h) if self._cluster else self._h
            r, err = ctypes.c_void_p(), _lib.Err()
            if not owner:
                rc = ENOTSUP
                err.msg = b"a sharded Client without `local` has no daemon on this host"
            else:
                rc = lib.kvs_region_create(owner, self._shm_bytes, ctypes.byref(r),
                                           ctypes.byref(err))
            if rc:
                self._region = False  # remote daemon or no region socket: bytes over gRPC
                self._region_rc, self._region_why = rc, err.msg.decode(errors="replace")
            else:
                self._region = r
        if self._region is False:
            if self._path == "shm":
                raise KvstashError(self._region_rc, "path='shm': " + self._region_why)
            return None
        return self._region

    def _ipc_may_take(self, data) -> bool:
        """Whether put() of data should go through put_many for the IPC path."""
        return (self._path in ("auto", "ipc") and self._ipc.refused is None and
                _arrays.is_tensor(data) and bool(data.is_cuda))

    def _ipc_regions(self, tensors, what: str):
        """The IPC path for one call: per entry of tensors (the CUDA tensors as given, None
        for host data), (its storage's region, its byte offset there); None when the call
        goes another way. Raises instead with path "ipc". Called with the region lock held;
        the tensors' devices are synchronized (torch's current stream), since the daemon
        reads and writes them outside its order."""
        if self._path not in ("auto", "ipc") or all(t is None for t in tensors):
            return None
        if self._region is False and self._region_rc == ENOTSUP and self._ipc.refused is None:
            # A remote daemon or no region socket: IPC is refused for the same reason (and
            # torch's _share_cuda_ need not run for nothing).
            self._ipc.refused = self._region_why
        try:
            for i, t in enumerate(tensors):
                if t is None:
                    raise _ipc.Unavailable(ENOTSUP, f"path='ipc' moves CUDA tensors: "
                                                    f"{what}[{i}] is host memory",
                                           caller=True)
                if not t.is_contiguous():
                    raise _ipc.Unavailable(ENOTSUP, f"path='ipc': {what}[{i}] must be "
                                                    f"contiguous", caller=True)
            regions = self._ipc.regions(self._h, tensors)
        except _ipc.Unavailable as e:
            if self._path != "ipc":
                return None
            if e.caller:
                raise ValueError("kvstash: " + e.msg) from None
            raise KvstashError(e.code, f"path='ipc': {e.msg}") from None
        import torch
        for dev in {t.device for t in tensors}:
            torch.cuda.current_stream(dev).synchronize()
        return regions

    def _region_view(self) -> np.ndarray:
        p = lib.kvs_region_data(self._region)
        return np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_uint8)),
                                     (lib.kvs_region_size(self._region),))

    def _pin_region_for_cuda(self):
        """Registers the region with CUDA once, so copies between it and CUDA tensors run
        at the copy engines' speed and asynchronously. Best effort: pageable copies work."""
        if self._region and not self._region_cuda:
            import torch
            rc = torch.cuda.cudart().cudaHostRegister(lib.kvs_region_data(self._region),
                                                      lib.kvs_region_size(self._region), 0)
            self._region_cuda = int(rc) == 0

    def put_many(self, ns: str, blocks) -> List[Union[PutResult, KvstashError]]:
        """Stores many blocks in one call: blocks is an iterable of (key, data), data as for
        put(). Returns, per block, a PutResult or the KvstashError that block got (the
        others are stored). Through shared memory, a batch larger than the region goes in
        several calls, each filling the region."""
        pairs = [(_keybuf(k), Src(d, f"blocks[{i}]")) for i, (k, d) in enumerate(blocks)]
        if not pairs:
            return []
        n = self._ns_fitting(ns, [src.nbytes for _, src in pairs])
        tokens = [self._tokens(n, src) for _, src in pairs]  # all checked before any is sent
        items = (_lib.PutItem * len(pairs))()
        for it, (k, src), t in zip(items, pairs, tokens):
            it.key = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p)
            it.key_len, it.tokens, it.len = len(k), t, src.nbytes

        def send(start, end):
            err = _lib.Err()
            sub = ctypes.cast(ctypes.byref(items, start * ctypes.sizeof(_lib.PutItem)),
                              ctypes.POINTER(_lib.PutItem))
            _check(self._c.put_many(self._h, ns.encode(), _DTYPES[n.dtype], sub, end - start,
                                    ctypes.byref(err)), err)
        with self._region_lock:
            ipc = self._ipc_regions([src.given for _, src in pairs], "blocks")
            if ipc is not None:  # every block read by the daemon from its tensor's storage
                self._tls.path = "ipc"
                for it, (region, off) in zip(items, ipc):
                    it.region, it.offset = region, off
                send(0, len(items))
                return self._put_results(items)
            region = self._region_for(max(src.nbytes for _, src in pairs))
            if region and any(src.cuda for _, src in pairs):
                self._pin_region_for_cuda()
            self._tls.path = "shm" if region else "grpc"
            view = self._region_view() if region else None
            start = 0
            while start < len(pairs):
                end, off = start, 0
                while end < len(pairs) and (not region or
                                            off + pairs[end][1].nbytes <= self._shm_bytes):
                    src, it = pairs[end][1], items[end]
                    if region:
                        src.copy_to(view[off:off + src.nbytes])
                        it.region, it.offset = region, off
                        off += src.nbytes
                    else:
                        it.data = src.host_array().ctypes.data
                    end += 1
                send(start, end)
                start = end
        return self._put_results(items)

    @staticmethod
    def _put_results(items) -> List[Union[PutResult, KvstashError]]:
        return [KvstashError(it.rc, it.msg.decode(errors="replace")) if it.rc else
                PutResult(_TIERS[it.res.tier], it.res.encoded_bytes, it.res.raw_bytes,
                          it.res.replaced, it.res.fallback) for it in items]

    def _decoder(self, ns: str, device):
        """libkvstash_cuda's decoder of namespace ns on the tensor's device (made once)."""
        import torch
        idx = device.index if device.index is not None else torch.cuda.current_device()
        d = self._decoders.get((ns, idx))
        if d is None:
            info, err = _lib.NsInfo(), _lib.Err()
            _check(self._c.ns_get(self._h, ns.encode(), ctypes.byref(info),
                                  ctypes.byref(err)), err)
            d = ctypes.c_void_p()
            with torch.cuda.device(idx):
                _check(self._cuda_lib.kvs_cuda_decoder_create(
                    self._h, ns.encode(), ctypes.byref(info.spec), ctypes.byref(d),
                    ctypes.byref(err)), err)
            self._decoders[(ns, idx)] = d
        return d

    def _decode_on_gpu(self, n: Namespace, dsts, whole: bool, local: bool) -> bool:
        """Whether this call fetches encoded blocks and decodes them on this GPU. "auto"
        does so for a remote daemon only: on this host, the daemon's decode into shared
        memory moved blocks faster (tests/bench/RESULTS.md, "restore by path")."""
        if self._gpu_decode == "off" or self._cluster or not any(d.cuda for d in dsts):
            return False
        if self._gpu_decode == "auto" and local:
            return False
        if not all(d.cuda for d in dsts):
            if self._gpu_decode == "on":
                raise ValueError("kvstash: gpu_decode='on' decodes into CUDA tensors; every "
                                 "out[i] must be one")
            return False
        if self._gpu_decode == "auto" and (not whole or (n.key_codec, n.value_codec) in
                                           (("none", "none"), ("fp16", "fp16"))):
            return False  # a layer range, or a codec that does not shrink the bytes moved
        if self._cuda_lib is None:
            self._cuda_lib = _lib.load_cuda() or False
        if not self._cuda_lib:
            if self._gpu_decode == "on":
                raise KvstashError(ENOTSUP, "gpu_decode='on' needs libkvstash_cuda (a CUDA "
                                            "build of the C library), which could not be loaded")
            return False
        if not whole:
            raise ValueError("kvstash: gpu_decode='on' decodes whole blocks; layers must be "
                             "None (or use gpu_decode='auto')")
        return True

    def get_many(self, ns: str, keys: Sequence, prefix: bool = False, layers=None,
                 out: Optional[Sequence] = None, local_first: Optional[bool] = None,
                 _fresh: bool = False) -> list:
        """Fetches many blocks in one call, in key order: per key, [L][2][t][H][D] (a numpy
        array, or a view of out[i]), None for an absent one. prefix=True stops at the first
        absent key and returns only the leading present blocks (Lookup + Get in one round
        trip). layers as for get(). out: one destination per key (contiguous numpy arrays or
        CPU/CUDA tensors of at least a full block's bytes); CUDA destinations are filled on
        torch's current stream of their device, which is synchronized before returning (by
        IPC, before the call: the daemon has written them when it returns).
        local_first (sharded with a local daemon): True or None asks it first, False only
        each key's owner."""
        n = self._ns(ns, fresh=_fresh)
        keys = [_keybuf(k) for k in keys]
        if not keys:
            return []
        lb, le = _arrays.layer_range(layers, n.layers)
        bb = n.block_bytes // n.layers * (le - lb)     # a full block's bytes of those layers
        if out is None:
            dsts = [Dst(np.empty(bb // 2, n.numpy_dtype), "out", bb) for _ in keys]
        else:
            out = list(out)
            if len(out) != len(keys):
                raise ValueError(f"kvstash: out has {len(out)} destinations for {len(keys)} "
                                 f"keys")
            dsts = [Dst(o, f"out[{i}]", bb) for i, o in enumerate(out)]
        whole = (lb, le) == (0, n.layers)
        items = (_lib.GetItem * len(keys))()
        for it, k in zip(items, keys):
            it.key = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p)
            it.key_len = len(k)

        opts = _lib.GetManyOpts(0, lb, 0 if whole else le, prefix, _ROUTES[local_first])

        def fetch(start, end, encoded: bool) -> int:
            """GetMany of items[start:end] (blocks as stored when encoded, for this GPU to
            decode); how many were served."""
            opts.format = 1 if encoded else 0
            served, err = ctypes.c_size_t(), _lib.Err()
            sub = ctypes.cast(ctypes.byref(items, start * ctypes.sizeof(_lib.GetItem)),
                              ctypes.POINTER(_lib.GetItem))
            _check(self._c.get_many(self._h, ns.encode(), sub, end - start,
                                    ctypes.byref(opts), ctypes.byref(served),
                                    ctypes.byref(err)), err)
            return served.value
        with self._region_lock:
            ipc = None if self._gpu_decode == "on" else self._ipc_regions(
                [d.obj if d.cuda else None for d in dsts], "out")
            if ipc is not None:  # decoded by the daemon straight into the tensors
                self._tls.path = "ipc"
                # The items of one call name one region: a call per run of destinations in
                # the same storage, in key order, so a prefix still stops where it ends.
                start = 0
                while start < len(keys):
                    end = start + 1
                    while end < len(keys) and ipc[end][0] is ipc[start][0]:
                        end += 1
                    for i in range(start, end):
                        items[i].cap = bb
                        items[i].region, items[i].offset = ipc[i]
                    if fetch(start, end, False) < end - start and prefix:
                        break
                    start = end
            else:
                self._get_via_bytes(n, items, dsts, fetch, bb, whole, prefix)
        if not _fresh and out is None and any(
                it.answered and (it.rc in (E2BIG, ENOSPC) or
                                 (it.rc == 0 and self._stale(n, it.res, lb, le)))
                for it in items):
            # Sizes the cached spec does not explain: the namespace changed shape. Once more.
            return self.get_many(ns, keys, prefix=prefix, layers=layers,
                                 local_first=local_first, _fresh=True)
        result = []
        for i, it in enumerate(items):
            if not it.answered or it.rc == ENOTFOUND:
                if prefix:
                    break
                result.append(None)
            elif it.rc:
                raise KvstashError(it.rc, it.msg.decode(errors="replace"))
            else:
                shape = (it.res.layer_end - it.res.layer_begin, 2, it.res.tokens, n.kv_heads,
                         n.head_dim)
                result.append(dsts[i].shaped(it.res.bytes, shape))
        return result

    def _get_via_bytes(self, n: Namespace, items, dsts, fetch, bb: int, whole: bool,
                       prefix: bool):
        """get_many through the shared-memory region or gRPC bytes (the region lock held):
        into the region's slots, host staging or the destinations themselves, decoded on
        this GPU where _decode_on_gpu says so."""
        local = self._region_for(bb) is not None
        gpu = self._decode_on_gpu(n, dsts, whole, local)
        cap = _enc_cap(bb) if gpu else bb
        region = self._region_for(cap)
        # Bytes that land somewhere other than their destination: the region's slots, or
        # host staging for CUDA destinations on the gRPC path.
        staged = region is not None or gpu or any(d.cuda for d in dsts)
        if region and any(d.cuda for d in dsts):
            self._pin_region_for_cuda()
        self._tls.path = ("shm" if region else "grpc") + ("+gpudecode" if gpu else "")
        # Through the region, windows of as many blocks as it holds; else one call.
        per = max(1, self._shm_bytes // cap) if region else len(items)
        for start in range(0, len(items), per):
            end = min(start + per, len(items))
            view = self._region_view() if region else (
                np.empty(cap * (end - start), np.uint8) if staged else None)
            for i in range(start, end):
                it, slot = items[i], (i - start) * cap
                it.cap = cap
                if region:
                    it.region, it.offset = region, slot
                elif staged:
                    it.buf = view.ctypes.data + slot
                else:
                    it.buf, it.cap = dsts[i].ptr, dsts[i].nbytes
            served = fetch(start, end, gpu)
            if staged:
                self._land(n, items[start:end], dsts[start:end], view, cap, gpu)
            if prefix and served < end - start:
                break  # the prefix ends in this window; later items stay unanswered

    def _land(self, n: Namespace, items, dsts, view: np.ndarray, cap: int, gpu: bool):
        """Moves the answered blocks from their slots in view into their destinations:
        decoded on the GPU (gpu), copied to the device, or copied in host memory. Called
        with the region lock held; returns once every copy out of view is done."""
        streams = set()
        batches = {}  # (device, stream) -> [(item, slot, destination)]: one decode call each
        for i, it in enumerate(items):
            if not it.answered or it.rc:
                continue
            d, slot = dsts[i], view[i * cap:i * cap + it.res.bytes]
            if gpu:
                key = (d.obj.device, _arrays.cuda_stream_ptr(d.obj))
                batches.setdefault(key, []).append((it, slot, d))
            else:
                d.fill(slot)
                if d.cuda:
                    streams.add(d.obj.device)
        for (device, stream), group in batches.items():
            blocks = (_lib.CudaBlock * len(group))()
            for b, (_, slot, d) in zip(blocks, group):
                b.enc, b.len, b.raw_dev, b.cap = slot.ctypes.data, slot.nbytes, d.ptr, d.nbytes
            err = _lib.Err()
            _check(self._cuda_lib.kvs_decode_blocks_cuda(
                self._decoder(n.name, device), blocks, len(group), stream, ctypes.byref(err)),
                err)
            for b, (it, _, _) in zip(blocks, group):
                if b.rc:  # this block only, as the daemon reports a block's own failure
                    it.rc, it.msg = b.rc, b.msg[:159]
                else:
                    it.res = b.res
        if streams:
            import torch
            for dev in streams:
                torch.cuda.current_stream(dev).synchronize()

    # ------------------------------------------------------------ paged layouts
    def _paged_args(self, ns: str, keys, cache, layout, pages, tokens, what: str):
        """Checks a paged call's arguments (every byte in the cache, README "Paged
        layouts"): the namespace, the keys, per key its tokens and page list, and the cache
        as a flat view of 2-byte elements (numpy or torch; it must be contiguous, since
        gather and scatter address its bytes)."""
        n = self._ns(ns)
        keys = [_keybuf(k) for k in keys]
        try:
            pages = [[int(x) for x in p] for p in pages]
        except TypeError:
            raise ValueError(f"kvstash: {what}: pages must hold one list of page ids per key"
                             ) from None
        if len(pages) != len(keys):
            raise ValueError(f"kvstash: {what}: {len(pages)} page lists for {len(keys)} keys")
        if _arrays.is_tensor(cache):
            if not cache.is_contiguous() or cache.element_size() != 2:
                raise ValueError(f"kvstash: {what}: cache must be a contiguous tensor of "
                                 f"2-byte elements")
            import torch
            flat, nbytes = cache.view(-1).view(torch.int16), cache.numel() * 2
        else:
            a = np.asarray(cache)
            if not a.flags.c_contiguous or a.itemsize != 2:
                raise ValueError(f"kvstash: {what}: cache must be a C-contiguous array of "
                                 f"2-byte elements")
            flat, nbytes = a.reshape(-1).view(np.uint16), a.nbytes
        if tokens is None or isinstance(tokens, int):
            ts = [n.block_tokens if tokens is None else tokens] * len(keys)
        else:
            ts = list(tokens)
            if len(ts) != len(keys):
                raise ValueError(f"kvstash: {what}: {len(ts)} token counts for {len(keys)} "
                                 f"keys")
        for i, t in enumerate(ts):
            if not 1 <= t <= n.block_tokens:
                raise ValueError(f"kvstash: {what}: tokens[{i}] {t} outside 1..{n.block_tokens}")
        for i, (pg, t) in enumerate(zip(pages, ts)):
            paged.check(layout, nbytes, pg, t, n.layers, n.kv_heads, n.head_dim, 2,
                        f"{what}: keys[{i}]")
        return n, keys, pages, ts, flat

    def _ipc_paged(self, cache, layout, item_type, keys):
        """The daemon-side path for a CUDA cache (the region lock held): (items of item_type
        for the keys, naming the cache's region; kvs_page_layout with the offsets made
        relative to the region; its arrays, kept alive), or None (no IPC, a cluster)."""
        if self._cluster or not _arrays.is_tensor(cache) or not cache.is_cuda:
            return None
        ipc = self._ipc_regions([cache], "cache")
        if ipc is None:
            return None
        region, off = ipc[0]
        L = len(layout.k_base)
        kb = (ctypes.c_uint64 * L)(*[off + b for b in layout.k_base])
        vb = (ctypes.c_uint64 * L)(*[off + b for b in layout.v_base])
        pl = _lib.PageLayout(layout.page_tokens, L, kb, vb, layout.page_stride,
                             layout.token_stride, layout.head_stride)
        self._tls.path = "ipc"
        items = _keyed(item_type, keys)
        for it in items:
            it.region = region
        return items, pl, (kb, vb)

    def put_many_paged(self, ns: str, keys: Sequence, cache, layout: "paged.PageLayout",
                       pages: Sequence[Sequence[int]], tokens=None
                       ) -> List[Union[PutResult, KvstashError]]:
        """Stores, per key, the block that lies in pages[i] of an engine's paged KV cache
        (layout: paged.PageLayout, byte offsets from the cache's start; tokens: of every
        block, or one count per key, default the namespace's block_tokens). A CUDA cache on
        the daemon's GPU goes by CUDA IPC and the daemon gathers the pages on the device (no
        copy here); anything else is gathered here and stored as put_many stores it. Per
        key, a PutResult or the KvstashError that block got."""
        n, keys, pages, ts, flat = self._paged_args(ns, keys, cache, layout, pages, tokens,
                                                    "put_many_paged")
        if not keys:
            return []
        with self._region_lock:
            direct = self._ipc_paged(cache, layout, _lib.PutItem, keys)
            if direct is not None:
                items, pl, _keep = direct
                arrays = [(ctypes.c_uint32 * len(pg))(*pg) for pg in pages]
                for it, t, pg in zip(items, ts, arrays):
                    it.tokens, it.pages, it.n_pages = t, pg, len(pg)
                err = _lib.Err()
                _check(lib.kvs_client_put_many_paged(self._h, ns.encode(), _DTYPES[n.dtype],
                                                     ctypes.byref(pl), items, len(keys),
                                                     ctypes.byref(err)), err)
                return self._put_results(items)
        blocks = []
        for pg, t in zip(pages, ts):
            shape = (n.layers, 2, t, n.kv_heads, n.head_dim)
            if isinstance(flat, np.ndarray):
                b = np.empty(shape, np.uint16)
            else:
                import torch
                b = torch.empty(shape, dtype=torch.int16, device=flat.device)
            paged.move(flat, layout, pg, b, t, to_pages=False)
            blocks.append(b)
        return self.put_many(ns, list(zip(keys, blocks)))

    def get_many_paged(self, ns: str, keys: Sequence, cache, layout: "paged.PageLayout",
                       pages: Sequence[Sequence[int]], prefix: bool = False) -> int:
        """Restores, per key, its block into pages[i] of an engine's paged KV cache (as
        put_many_paged names them; a block shorter than the namespace's block_tokens fills
        the first pages of its share). Returns how many keys were restored: with prefix, the
        leading present ones (the rest untouched); without, every key must be present
        (KvstashError NOT_FOUND otherwise, after the present ones were written). A CUDA cache
        on the daemon's GPU is written by the daemon's engine (CUDA IPC); anything else is
        fetched and scattered here."""
        n, keys, pages, _, flat = self._paged_args(ns, keys, cache, layout, pages, None,
                                                   "get_many_paged")
        if not keys:
            return 0
        with self._region_lock:
            direct = self._ipc_paged(cache, layout, _lib.GetItem, keys)
            if direct is not None:
                items, pl, _keep = direct
                flat_pages = (ctypes.c_uint32 * sum(len(p) for p in pages))(
                    *[x for p in pages for x in p])
                opts = _lib.GetManyOpts(0, 0, 0, prefix, 0, ctypes.pointer(pl), flat_pages,
                                        len(flat_pages))
                served, err = ctypes.c_size_t(), _lib.Err()
                _check(lib.kvs_client_get_many(self._h, ns.encode(), items, len(keys),
                                               ctypes.byref(opts), ctypes.byref(served),
                                               ctypes.byref(err)), err)
                for it in items[:served.value]:
                    if it.rc:
                        raise KvstashError(it.rc, it.msg.decode(errors="replace"))
                if not prefix and served.value < len(keys):
                    raise KvstashError(ENOTFOUND, f"get_many_paged: {len(keys) - served.value}"
                                                  f" of {len(keys)} keys absent")
                return served.value
        got = self.get_many(ns, keys, prefix=prefix)
        done = 0
        for i, b in enumerate(got):
            if b is None:
                continue
            b = np.ascontiguousarray(b).view(flat.dtype if isinstance(flat, np.ndarray)
                                             else np.int16)  # the bits, as they are
            if not isinstance(flat, np.ndarray):
                import torch
                b = torch.from_numpy(b).to(flat.device)
            paged.move(flat, layout, pages[i], b, b.shape[2], to_pages=True)
            done += 1
        if not prefix and done < len(keys):
            raise KvstashError(ENOTFOUND, f"get_many_paged: {len(keys) - done} of "
                                          f"{len(keys)} keys absent")
        return done

    def get_prefix(self, ns: str, keys: Sequence, layers=None,
                   out: Optional[Sequence] = None) -> list:
        """The leading present blocks of keys (a cached prompt prefix), in one call; layers
        and out as for get_many."""
        return self.get_many(ns, keys, prefix=True, layers=layers, out=out)

    # ------------------------------------------------------------------ keys
    def lookup(self, ns: str, keys: Sequence) -> Tuple[int, List[str]]:
        """(how many leading keys are present, each key's tier: "gpu"/"host"/"disk"/"none")."""
        arr = _keys(keys)
        prefix, tiers, err = ctypes.c_uint32(), (ctypes.c_int * len(keys))(), _lib.Err()
        _check(self._c.lookup(self._h, ns.encode(), arr, len(keys), ctypes.byref(prefix),
                              tiers, ctypes.byref(err)), err)
        return prefix.value, [_TIERS.get(t, "none") for t in tiers]

    def lookup_codecs(self, ns: str, keys: Sequence) -> Tuple[int, List[Tuple[str, str, str]]]:
        """lookup, and the codecs each block's keys and values are stored with: (prefix,
        [(tier, key_codec, value_codec)]), the codecs "" for an absent key and where the
        namespace's blocks all have its own codecs (no bound, no host or disk codec). One
        daemon only."""
        self._one_daemon("lookup_codecs")
        arr, n = _keys(keys), len(keys)
        prefix, tiers, err = ctypes.c_uint32(), (ctypes.c_int * n)(), _lib.Err()
        codecs = (_lib.BlockCodecs * n)()
        _check(lib.kvs_client_lookup_codecs(self._h, ns.encode(), arr, n, ctypes.byref(prefix),
                                            tiers, None, codecs, ctypes.byref(err)), err)
        return prefix.value, [(_TIERS.get(t, "none"), c.key_codec.decode(),
                               c.value_codec.decode()) for t, c in zip(tiers, codecs)]

    def exists(self, ns: str, keys: Sequence) -> List[bool]:
        arr = _keys(keys)
        out, err = (ctypes.c_bool * len(keys))(), _lib.Err()
        _check(self._c.exists(self._h, ns.encode(), arr, len(keys), out,
                              ctypes.byref(err)), err)
        return list(out)

    def delete(self, ns: str, keys: Sequence) -> int:
        """Deletes the keys that exist; returns how many."""
        arr = _keys(keys)
        n, err = ctypes.c_uint32(), _lib.Err()
        _check(self._c.delete(self._h, ns.encode(), arr, len(keys), ctypes.byref(n),
                              ctypes.byref(err)), err)
        return n.value

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """The daemon's Stats as a dict: tiers, namespaces, rpcs, data_plane, misses,
        admin (the progress counters of Verify and Flush calls since the daemon started:
        verify_planned, verify_checked, flush_queued, flush_done), and gpu_devices (each
        device's GPU tier of a daemon with several, in its --gpu order; tiers["gpu"] is
        their sum)."""
        self._one_daemon("stats")
        p, err = ctypes.POINTER(_lib.Stats)(), _lib.Err()
        _check(lib.kvs_client_stats(self._h, ctypes.byref(p), ctypes.byref(err)), err)
        try:
            s = p.contents
            dp = s.data_plane
            return {
                "version": s.version.decode(), "uptime_ms": s.uptime_ms, "misses": s.misses,
                "tiers": {_TIERS[t.tier]: {f: getattr(t, f) for f in (
                    "capacity_bytes", "used_bytes", "blocks", "hits", "evictions",
                    "recoded_blocks", "recode_saved_bytes", "block_meta_bytes")}
                    for t in s.tiers[:s.n_tiers]},
                "namespaces": [_ns_of(s.namespaces[i]) for i in range(s.n_namespaces)],
                "rpcs": {s.rpcs[i].method.decode(): (s.rpcs[i].calls, s.rpcs[i].errors)
                         for i in range(s.n_rpcs)},
                "data_plane": {f: getattr(dp, f) for f, _ in dp._fields_},
                "admin": {f: getattr(s.admin, f) for f, _ in s.admin._fields_},
                "gpu_devices": [{f: getattr(g, f) for f, _ in g._fields_}
                                for g in s.gpus[:s.n_gpus]],
            }
        finally:
            lib.kvs_stats_free(p)


    # ------------------------------------------------------------------ sharding
    def nodes(self) -> List[dict]:
        """The daemons of a sharded Client: per daemon its id ("10.0.0.7:50051"), whether
        it is `local`, `up` (False while marked down), `retry_in_ms`, `failures` and `why`
        it is down; the ring's in id order, then the local one."""
        if not self._cluster:
            return [{"id": self._opts.target.decode(), "local": False, "up": True,
                     "retry_in_ms": 0, "failures": 0, "why": ""}]
        n, err = ctypes.c_size_t(), _lib.Err()
        _check(lib.kvs_cluster_nodes(self._h, None, 0, ctypes.byref(n), ctypes.byref(err)), err)
        arr = (_lib.ClusterNode * (n.value + 4))()  # room for a refresh in between
        _check(lib.kvs_cluster_nodes(self._h, arr, len(arr), ctypes.byref(n),
                                     ctypes.byref(err)), err)
        return [{"id": x.id.decode(), "local": x.local, "up": x.up,
                 "retry_in_ms": x.retry_in_ms, "failures": x.failures,
                 "why": x.why.decode(errors="replace")} for x in arr[:min(n.value, len(arr))]]

    def owner(self, key) -> str:
        """The id of the daemon that owns key (rendezvous hashing over nodes())."""
        if not self._cluster:
            return self._opts.target.decode()
        k = _keybuf(key)
        out, err = ctypes.create_string_buffer(_lib.NODE_ID_MAX), _lib.Err()
        _check(lib.kvs_cluster_owner(self._h, k, len(k), out, ctypes.byref(err)), err)
        return out.value.decode()


def block_keys(token_ids: Sequence[int], block_tokens: int,
               parent: Optional[bytes] = None) -> List[bytes]:
    """The chained block keys of a token sequence (DESIGN §1, README "Block keys"): the same
    16-byte keys as kvs_key_chain_seq and `kvctl key`; the last block may be partial.
    parent: the key of the block just before token_ids[0], to continue a sequence whose
    earlier blocks are keyed already (None: token_ids starts the sequence)."""
    if block_tokens <= 0:
        raise ValueError(f"kvstash: block_tokens must be positive, got {block_tokens}")
    toks = (ctypes.c_uint32 * len(token_ids))(*token_ids)
    if parent is None:
        need = lib.kvs_key_chain_seq(toks, len(token_ids), block_tokens, None, 0)
        keys = (_lib.Key * need)()
        lib.kvs_key_chain_seq(toks, len(token_ids), block_tokens, keys, need)
        return [bytes(k.bytes[:k.len]) for k in keys]
    prev = bytes(parent)
    if len(prev) != 16:
        raise ValueError(f"kvstash: parent is a 16-byte block key, got {len(prev)} bytes")
    out, key = [], (ctypes.c_uint8 * 16)()
    for b in range(0, len(token_ids), block_tokens):
        n = min(block_tokens, len(token_ids) - b)
        lib.kvs_key_chain(prev, ctypes.cast(ctypes.byref(toks, 4 * b),
                                            ctypes.POINTER(ctypes.c_uint32)), n, key)
        prev = bytes(key)
        out.append(prev)
    return out
