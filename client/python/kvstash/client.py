"""kvstash.Client: the Python face of libkvstash (see the package docstring)."""
import ctypes
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _lib
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
ENOTFOUND, ENOTSUP = -30002, -30012


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


def _ns_of(info: _lib.NsInfo) -> Namespace:
    s = info.spec
    return Namespace(s.name.decode(), s.layers, s.kv_heads, s.head_dim, s.block_tokens,
                     {1: "fp16", 2: "bf16"}.get(s.dtype, "?"), s.key_codec.decode(),
                     s.value_codec.decode(), bool(s.durable), info.blocks, info.stored_bytes,
                     info.raw_bytes, info.block_bytes)


def _as_array(data) -> np.ndarray:
    """A C-contiguous numpy view of host memory without a copy: numpy arrays, buffer-protocol
    objects and CPU torch tensors (bf16 viewed as int16). CUDA tensors are not taken yet."""
    if hasattr(data, "is_cuda"):  # a torch tensor
        if data.is_cuda:
            raise NotImplementedError(
                "kvstash: CUDA tensors are not supported by this version of the package (copy "
                "to the host with .cpu(); CUDA IPC and GPU decode: issue 13)")
        t = data.contiguous()
        if str(t.dtype) == "torch.bfloat16":
            import torch
            t = t.view(torch.int16)
        data = t.numpy()
    a = np.ascontiguousarray(np.asarray(data))  # no copy when already contiguous
    if a.dtype.itemsize != 2:
        raise TypeError(f"kvstash: KV arrays hold 2-byte elements (fp16 or bf16 bits), "
                        f"got {a.dtype}")
    return a


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
    """A connection to kvstashd (one gRPC channel; thread-safe).

        with kvstash.Client("127.0.0.1:50051") as c:
            c.create_namespace("llama", layers=32, kv_heads=8, head_dim=128, block_tokens=16,
                               key_codec="polarquant", value_codec="polarquant")
            c.put_many("llama", zip(keys, blocks))          # blocks: [L][2][t][H][D] arrays
            blocks = c.get_prefix("llama", keys)            # the leading present blocks

    Batched calls take the fastest path the daemon allows: shared memory when it runs on
    this host (a region registered once, `shared_memory_bytes` large), else bytes over gRPC;
    `last_path` says which one the last batched call of this thread took ("shm" or "grpc").
    """

    def __init__(self, target: str = "127.0.0.1:50051", token: Optional[str] = None,
                 timeout_ms: int = 30000, shared_memory_bytes: int = 256 << 20):
        self._opts = _lib.ClientOpts(target.encode(), token.encode() if token else None,
                                     timeout_ms, 0, 0)
        self._h = ctypes.c_void_p()
        err = _lib.Err()
        _check(lib.kvs_client_connect(ctypes.byref(self._opts), ctypes.byref(self._h),
                                      ctypes.byref(err)), err)
        self._shm_bytes = shared_memory_bytes
        self._region = None      # kvs_region*, or False once the daemon said no
        self._region_lock = threading.Lock()  # the region's bytes serve one call at a time
        self._ns_cache = {}
        self._tls = threading.local()

    # ------------------------------------------------------------------ lifetime
    def close(self):
        """Closes the connection (and the shared-memory region). Idempotent."""
        if self._region:
            lib.kvs_region_close(self._region)
        self._region = None
        if self._h:
            lib.kvs_client_close(self._h)
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
        """"shm" or "grpc": the path the last batched call of this thread took."""
        return getattr(self._tls, "path", None)

    # ------------------------------------------------------------------ namespaces
    def create_namespace(self, name: str, layers: int, kv_heads: int, head_dim: int,
                         block_tokens: int, dtype: str = "fp16", key_codec: str = "none",
                         value_codec: str = "none", durable: bool = False,
                         keys_pre_rope: bool = False, seed: int = 0) -> Namespace:
        """Creates a namespace (KvAdmin.CreateNamespace); see the README for codecs."""
        if dtype not in _DTYPES:
            raise ValueError(f"kvstash: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        s = _lib.NsSpec(name.encode(), layers, kv_heads, head_dim, block_tokens,
                        _DTYPES[dtype], key_codec.encode(), value_codec.encode(),
                        keys_pre_rope, durable, seed)
        info, err = _lib.NsInfo(), _lib.Err()
        _check(lib.kvs_client_ns_create(self._h, ctypes.byref(s), ctypes.byref(info),
                                        ctypes.byref(err)), err)
        return _ns_of(info)

    def drop_namespace(self, name: str) -> int:
        """Drops a namespace and its blocks; returns how many blocks went."""
        n, err = ctypes.c_uint64(), _lib.Err()
        _check(lib.kvs_client_ns_drop(self._h, name.encode(), ctypes.byref(n),
                                      ctypes.byref(err)), err)
        self._ns_cache.pop(name, None)
        return n.value

    def namespace(self, name: str) -> Namespace:
        info, err = _lib.NsInfo(), _lib.Err()
        _check(lib.kvs_client_ns_get(self._h, name.encode(), ctypes.byref(info),
                                     ctypes.byref(err)), err)
        return _ns_of(info)

    def namespaces(self) -> List[Namespace]:
        p, n, err = ctypes.POINTER(_lib.NsInfo)(), ctypes.c_size_t(), _lib.Err()
        _check(lib.kvs_client_ns_list(self._h, ctypes.byref(p), ctypes.byref(n),
                                      ctypes.byref(err)), err)
        try:
            return [_ns_of(p[i]) for i in range(n.value)]
        finally:
            ctypes.CDLL(None).free(p)

    def _ns(self, name: str) -> Namespace:
        ns = self._ns_cache.get(name)
        if ns is None:
            ns = self._ns_cache[name] = self.namespace(name)
        return ns

    def _tokens(self, ns: Namespace, a: np.ndarray) -> int:
        if a.nbytes == 0 or a.nbytes % ns.token_bytes:
            raise ValueError(f"kvstash: {a.nbytes} bytes are not whole tokens of namespace "
                             f"'{ns.name}' ({ns.token_bytes} bytes per token: "
                             f"[{ns.layers}][2][t][{ns.kv_heads}][{ns.head_dim}])")
        return a.nbytes // ns.token_bytes

    # ------------------------------------------------------------------ one block
    def put(self, ns: str, key, data) -> PutResult:
        """Stores one block: data is [L][2][t][H][D] (any shape with those bytes) of the
        namespace's dtype; t is taken from its size."""
        n = self._ns(ns)
        a = _as_array(data)
        k = _keybuf(key)
        res, err = _lib.PutResult(), _lib.Err()
        _check(lib.kvs_client_put(self._h, ns.encode(), k, len(k), self._tokens(n, a),
                                  _DTYPES[n.dtype], a.ctypes.data, a.nbytes, ctypes.byref(res),
                                  ctypes.byref(err)), err)
        return PutResult(_TIERS[res.tier], res.encoded_bytes, res.raw_bytes, res.replaced)

    def get(self, ns: str, key, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Fetches one block, decoded, as an array [L][2][t][H][D] (into `out` when given:
        a contiguous array of at least the block's bytes). KvstashError NOT_FOUND if absent."""
        n = self._ns(ns)
        buf = out if out is not None else np.empty(n.block_bytes // 2, n.numpy_dtype)
        if not buf.flags.c_contiguous:
            raise ValueError("kvstash: out must be C-contiguous")
        k = _keybuf(key)
        res, err = _lib.GetResult(), _lib.Err()
        _check(lib.kvs_client_get(self._h, ns.encode(), k, len(k), buf.ctypes.data, buf.nbytes,
                                  ctypes.byref(res), ctypes.byref(err)), err)
        flat = buf.reshape(-1)[: res.bytes // 2]
        return flat.reshape(n.layers, 2, res.tokens, n.kv_heads, n.head_dim)

    # ------------------------------------------------------------------ batches
    def _region_for(self, nbytes: int):
        """The shared-memory region if the daemon is on this host and it fits, else None."""
        if self._region is False or nbytes > self._shm_bytes:
            return None
        if self._region is None:
            r, err = ctypes.c_void_p(), _lib.Err()
            rc = lib.kvs_region_create(self._h, self._shm_bytes, ctypes.byref(r),
                                       ctypes.byref(err))
            if rc:
                self._region = False  # remote daemon or no region socket: bytes over gRPC
                return None
            self._region = r
        return self._region

    def _region_view(self) -> np.ndarray:
        p = lib.kvs_region_data(self._region)
        return np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_uint8)),
                                     (lib.kvs_region_size(self._region),))

    def put_many(self, ns: str, blocks) -> List[Union[PutResult, KvstashError]]:
        """Stores many blocks in one call: blocks is an iterable of (key, data). Returns, per
        block, a PutResult or the KvstashError that block got (the others are stored)."""
        n = self._ns(ns)
        pairs = [(_keybuf(k), _as_array(d)) for k, d in blocks]
        if not pairs:
            return []
        items = (_lib.PutItem * len(pairs))()
        total = sum(a.nbytes for _, a in pairs)
        err = _lib.Err()
        with self._region_lock:
            region = self._region_for(total)
            off = 0
            view = self._region_view() if region else None
            for i, (k, a) in enumerate(pairs):
                items[i].key = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p)
                items[i].key_len = len(k)
                items[i].tokens = self._tokens(n, a)
                items[i].len = a.nbytes
                if region:
                    view[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
                    items[i].region, items[i].offset = region, off
                    off += a.nbytes
                else:
                    items[i].data = a.ctypes.data
            self._tls.path = "shm" if region else "grpc"
            rc = lib.kvs_client_put_many(self._h, ns.encode(), _DTYPES[n.dtype], items,
                                         len(pairs), ctypes.byref(err))
        _check(rc, err)
        return [KvstashError(it.rc, it.msg.decode(errors="replace")) if it.rc else
                PutResult(_TIERS[it.res.tier], it.res.encoded_bytes, it.res.raw_bytes,
                          it.res.replaced) for it in items]

    def get_many(self, ns: str, keys: Sequence, prefix: bool = False
                 ) -> List[Optional[np.ndarray]]:
        """Fetches many blocks in one call, in key order: an array [L][2][t][H][D] per key,
        None for an absent one. prefix=True stops at the first absent key and returns only
        the leading present blocks (Lookup + Get in one round trip)."""
        n = self._ns(ns)
        keys = [_keybuf(k) for k in keys]
        if not keys:
            return []
        bb = n.block_bytes
        items = (_lib.GetItem * len(keys))()
        outs = [np.empty(bb // 2, n.numpy_dtype) for _ in keys]
        opts = _lib.GetManyOpts(0, 0, 0, prefix)
        served, err = ctypes.c_size_t(), _lib.Err()
        with self._region_lock:
            region = self._region_for(bb * len(keys))
            for i, k in enumerate(keys):
                items[i].key = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p)
                items[i].key_len = len(k)
                items[i].cap = bb
                if region:
                    items[i].region, items[i].offset = region, i * bb
                else:
                    items[i].buf = outs[i].ctypes.data
            self._tls.path = "shm" if region else "grpc"
            rc = lib.kvs_client_get_many(self._h, ns.encode(), items, len(keys),
                                         ctypes.byref(opts), ctypes.byref(served),
                                         ctypes.byref(err))
            if rc == 0 and region:
                view = self._region_view()
                for i, it in enumerate(items):
                    if it.answered and it.rc == 0:
                        outs[i].view(np.uint8)[:it.res.bytes] = view[i * bb:i * bb + it.res.bytes]
        _check(rc, err)
        result = []
        for i, it in enumerate(items):
            if not it.answered:
                if prefix:
                    break
                result.append(None)
            elif it.rc == ENOTFOUND:
                if prefix:
                    break
                result.append(None)
            elif it.rc:
                raise KvstashError(it.rc, it.msg.decode(errors="replace"))
            else:
                t = it.res.tokens
                result.append(outs[i][: it.res.bytes // 2].reshape(n.layers, 2, t, n.kv_heads,
                                                                   n.head_dim))
        return result

    def get_prefix(self, ns: str, keys: Sequence) -> List[np.ndarray]:
        """The leading present blocks of keys (a cached prompt prefix), in one call."""
        return self.get_many(ns, keys, prefix=True)

    # ------------------------------------------------------------------ keys
    def lookup(self, ns: str, keys: Sequence) -> Tuple[int, List[str]]:
        """(how many leading keys are present, each key's tier: "gpu"/"host"/"disk"/"none")."""
        arr = _keys(keys)
        prefix, tiers, err = ctypes.c_uint32(), (ctypes.c_int * len(keys))(), _lib.Err()
        _check(lib.kvs_client_lookup(self._h, ns.encode(), arr, len(keys), ctypes.byref(prefix),
                                     tiers, ctypes.byref(err)), err)
        return prefix.value, [_TIERS.get(t, "none") for t in tiers]

    def exists(self, ns: str, keys: Sequence) -> List[bool]:
        arr = _keys(keys)
        out, err = (ctypes.c_bool * len(keys))(), _lib.Err()
        _check(lib.kvs_client_exists(self._h, ns.encode(), arr, len(keys), out,
                                     ctypes.byref(err)), err)
        return list(out)

    def delete(self, ns: str, keys: Sequence) -> int:
        """Deletes the keys that exist; returns how many."""
        arr = _keys(keys)
        n, err = ctypes.c_uint32(), _lib.Err()
        _check(lib.kvs_client_delete(self._h, ns.encode(), arr, len(keys), ctypes.byref(n),
                                     ctypes.byref(err)), err)
        return n.value

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """The daemon's Stats as a dict: tiers, namespaces, rpcs, data_plane, misses."""
        p, err = ctypes.POINTER(_lib.Stats)(), _lib.Err()
        _check(lib.kvs_client_stats(self._h, ctypes.byref(p), ctypes.byref(err)), err)
        try:
            s = p.contents
            dp = s.data_plane
            return {
                "version": s.version.decode(), "uptime_ms": s.uptime_ms, "misses": s.misses,
                "tiers": {_TIERS[t.tier]: {f: getattr(t, f) for f in (
                    "capacity_bytes", "used_bytes", "blocks", "hits", "evictions")}
                    for t in s.tiers[:s.n_tiers]},
                "namespaces": [_ns_of(s.namespaces[i]) for i in range(s.n_namespaces)],
                "rpcs": {s.rpcs[i].method.decode(): (s.rpcs[i].calls, s.rpcs[i].errors)
                         for i in range(s.n_rpcs)},
                "data_plane": {f: getattr(dp, f) for f, _ in dp._fields_},
            }
        finally:
            lib.kvs_stats_free(p)


def block_keys(token_ids: Sequence[int], block_tokens: int) -> List[bytes]:
    """The chained block keys of a token sequence (DESIGN §1, README "Block keys"): the same
    16-byte keys as kvs_key_chain_seq and `kvctl key`; the last block may be partial."""
    toks = (ctypes.c_uint32 * len(token_ids))(*token_ids)
    need = lib.kvs_key_chain_seq(toks, len(token_ids), block_tokens, None, 0)
    keys = (_lib.Key * need)()
    lib.kvs_key_chain_seq(toks, len(token_ids), block_tokens, keys, need)
    return [bytes(k.bytes[:k.len]) for k in keys]
