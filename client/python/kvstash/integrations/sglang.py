"""KvstashHiCacheStorage: an SGLang HiCache L3 storage backend that keeps pages in kvstashd.

Enable it in SGLang with the "dynamic" backend, which imports a class named in the extra config:

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-mem-layout page_first --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name":"kvstash",
            "module_path":"kvstash.integrations.sglang","class_name":"KvstashHiCacheStorage",
            "interface_v1":1,"target":"unix:/run/kvstash.sock","namespace":"llama-8b",
            "codec":"kivi-4"}'

with this package importable (PYTHONPATH=client/python, KVSTASH_LIB=.../libkvstash.so.0).
backend_name, module_path and class_name are SGLang's (StorageBackendFactory); "interface_v1":1
makes SGLang's cache controller call batch_get_v1/batch_set_v1 (one GetMany/PutMany straight
on the host pool) instead of the older batch_get/batch_set on flat page copies; both work.
Our keys of the extra config (all optional):
  target        kvstashd address; default $KVSTASH_TARGET, else 127.0.0.1:50051. A Unix
                socket (unix:PATH) on the same host lets batches go through shared memory.
  namespace     default "sglang". One namespace per model (page hashes say nothing about the
                model). Under tensor, pipeline or context parallelism each rank holds a
                different slice of every page, so ".tp<r>of<n>" / ".pp<r>of<n>" / ".cp<r>of<n>"
                is appended for each of them that is > 1.
  codec         key and value codec of a namespace this backend creates (default "none");
                key_codec / value_codec set them apart. An existing namespace is used as it is,
                if its shape (layers, KV heads, head_dim, page size, dtype) matches.
  token, timeout_ms, shared_memory_bytes   passed to kvstash.Client.

Written against SGLang's source at commit 001067fffe33427bee0ed2f007fb7551a1d76b44
(python/sglang/srt/mem_cache/hicache_storage.py, storage/backend_factory.py,
managers/cache_controller.py) and the MHA host pool at 0047d999bb3a3ad311df5a4b6356bfb5586e0d66
(mem_cache/pool_host/mha.py). It has been tested only with a driver that calls these methods
as SGLang's cache controller does, on numpy stand-ins of the host pool
(tests/integration/test_sglang_adapter.py), never inside a running SGLang.

What it stores. One kvstash block per SGLang page: [L][2][page_size][H][D] of the pool's dtype
(fp16 or bf16), gathered from the host pool's kv_buffer in any of its MHA layouts
(layer_first [2][L][S][H][D], page_first [2][S][L][H][D], page_first_direct
[2][P][L][p][H][D], page_head [2][P][H][p][L][D]); host_indices are token slots, page i
being host_indices[i*page_size:(i+1)*page_size]. The flat pages of batch_get/batch_set/get/set
are the pool's get_data_page order and are reordered to the same blocks, so both paths share
what they store.

Keys. SGLang's page hashes are SHA-256 hex digests: a lowercase hex string of 2..128 digits is
stored as its bytes (32 for SHA-256); anything else (other strings, or bytes longer than 64) as
the SHA-256 of it. Hex and non-hex keys thus share one 32-byte space: a non-hex key k and the
hex key sha256(k).hexdigest() are the same page.

Not supported: MLA and other pools that are not [2][...] MHA pools (NotImplementedError at
register_mem_pool_host), fp8 host pools, CUDA-resident host buffers, heterogeneous-TP head
splitting (should_split_heads), and the v2 interface (batch_*_v2, extra pools such as DSA
indexers or Mamba states: SGLang's base raises NotImplementedError for them).

Threading: SGLang calls batch_exists from its prefetch thread, batch_get* from the prefetch IO
thread and batch_set* from the backup thread, concurrently. The kvstash Client is thread-safe
and made on first use (under a lock); distinct calls touch distinct host slots. Failures of
kvstashd are logged and reported as misses (False / 0 / None), never raised into those threads,
which SGLang does not restart.
"""
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np

from ..client import Client, KvstashError

log = logging.getLogger(__name__)

try:  # SGLang's base class when SGLang is installed: its loader checks issubclass
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # type: ignore
    HAVE_SGLANG = True
except Exception:  # ImportError, or an SGLang whose import fails on this host
    HAVE_SGLANG = False

    class HiCacheStorage:
        """Stand-in for SGLang's HiCacheStorage with the same method names, so the backend
        imports and can be driven without SGLang. The v2 methods raise as SGLang's do."""

        def register_mem_pool_host(self, mem_pool_host):
            self.mem_pool_host = mem_pool_host

        def register_mem_host_pool_v2(self, host_pool, host_pool_name):
            if not hasattr(self, "registered_pools"):
                self.registered_pools = {}
            self.registered_pools[host_pool_name] = host_pool

        def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
            raise NotImplementedError()

        def batch_get_v2(self, transfers, extra_info=None):
            raise NotImplementedError()

        def batch_set_v2(self, transfers, extra_info=None):
            raise NotImplementedError()

        def batch_get_v1(self, keys, host_indices, extra_info=None):
            raise NotImplementedError()

        def batch_set_v1(self, keys, host_indices, extra_info=None):
            raise NotImplementedError()

        def get(self, key, target_location=None, target_sizes=None):
            raise NotImplementedError()

        def batch_get(self, keys, target_locations=None, target_sizes=None):
            raise NotImplementedError()

        def set(self, key, value=None, target_location=None, target_sizes=None):
            raise NotImplementedError()

        def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
            raise NotImplementedError()

        def exists(self, key):
            raise NotImplementedError()

        def batch_exists(self, keys, extra_info=None):
            for i, k in enumerate(keys):
                if not self.exists(k):
                    return i
            return len(keys)

        def clear(self):
            pass

        def get_stats(self):
            return None


# ---------------------------------------------------------------------------------- keys
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,64}")


def key_of_page_hash(key) -> bytes:
    """A kvstash key (1..64 bytes) from an SGLang page hash (see the module docstring)."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
        return b if 1 <= len(b) <= 64 else hashlib.sha256(b).digest()
    s = str(key)
    if _HEX.fullmatch(s):
        return bytes.fromhex(s)
    return hashlib.sha256(s.encode()).digest()


# ---------------------------------------------------------------------------------- config
@dataclass
class KvstashHiCacheConfig:
    target: str = "127.0.0.1:50051"
    namespace: str = "sglang"
    key_codec: str = "none"
    value_codec: str = "none"
    token: Optional[str] = None
    timeout_ms: int = 30000
    shared_memory_bytes: int = 256 << 20

    @classmethod
    def from_storage_config(cls, storage_config, kwargs=None) -> "KvstashHiCacheConfig":
        """From SGLang's HiCacheStorageConfig (its extra_config dict) and the kwargs dict the
        dynamic loader passes; kwargs win. Rank suffixes are added to the namespace."""
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        extra.update(kwargs or {})
        codec = extra.get("codec", "none")
        ns = str(extra.get("namespace", "sglang"))
        for axis in ("tp", "pp", "attn_cp"):
            size = int(getattr(storage_config, f"{axis}_size", 1) or 1)
            if size > 1:
                rank = int(getattr(storage_config, f"{axis}_rank", 0) or 0)
                ns += f".{axis.replace('attn_', '')}{rank}of{size}"
        if getattr(storage_config, "should_split_heads", False):
            raise NotImplementedError("kvstash: heterogeneous-TP head splitting "
                                      "(tp_lcm_size) is not supported")
        return cls(target=extra.get("target") or os.environ.get("KVSTASH_TARGET")
                   or "127.0.0.1:50051",
                   namespace=ns,
                   key_codec=extra.get("key_codec", codec),
                   value_codec=extra.get("value_codec", codec),
                   token=extra.get("token"),
                   timeout_ms=int(extra.get("timeout_ms", 30000)),
                   shared_memory_bytes=int(extra.get("shared_memory_bytes", 256 << 20)))


# ---------------------------------------------------------------------------------- pool
# Axis labels of each MHA host layout's kv_buffer: K = the K/V axis (2), L layers, S token
# slots, P pages, p token within a page, H heads, D head_dim. A block is "LKtHD".
_LAYOUTS = {"layer_first": "KLSHD", "page_first": "KSLHD",
            "page_first_direct": "KPLpHD", "page_head": "KPHpLD"}
_BLOCK = "LKtHD"


def _is_torch(t) -> bool:
    return type(t).__module__.startswith("torch")


def _np(t) -> np.ndarray:
    """A numpy view (no copy) of a CPU tensor or array; bf16 as int16 bits."""
    if _is_torch(t):
        if t.device.type != "cpu":
            raise NotImplementedError("kvstash: the host pool must be in CPU memory")
        if "bfloat16" in str(t.dtype):
            import torch
            t = t.view(torch.int16)
        return t.numpy()
    return np.asarray(t)


def _indices(host_indices) -> np.ndarray:
    if _is_torch(host_indices):
        host_indices = host_indices.cpu().numpy()
    return np.asarray(host_indices, dtype=np.int64).reshape(-1)


def _dtype_name(dtype) -> str:
    s = str(getattr(dtype, "__name__", dtype))  # torch.float16, numpy's float16 class
    if s.endswith("bfloat16"):
        return "bf16"
    if s.endswith("float16") or s.endswith("half"):
        return "fp16"
    raise NotImplementedError(f"kvstash: host pool dtype {s} (kvstash stores fp16 and bf16)")


class _Pool:
    """The registered host pool as seen by kvstash: its kv_buffer as a numpy view, and page
    gathers/scatters between that buffer and [n][L][2][page_size][H][D] blocks."""

    def __init__(self, pool):
        self.layout = getattr(pool, "layout", "layer_first")
        if self.layout not in _LAYOUTS:
            raise NotImplementedError(f"kvstash: host pool layout '{self.layout}' "
                                      f"(supported: {', '.join(_LAYOUTS)})")
        kv = getattr(pool, "kv_buffer", None)
        if kv is None or isinstance(kv, (list, tuple)):
            raise NotImplementedError("kvstash: only MHA host pools with one kv_buffer "
                                      "(not MLA or split K/V pools) are supported")
        self.ps = int(pool.page_size)
        self.L, self.H, self.D = int(pool.layer_num), int(pool.head_num), int(pool.head_dim)
        self.dtype = _dtype_name(getattr(pool, "dtype", kv.dtype))
        self.buf = _np(kv)
        self.labels = _LAYOUTS[self.layout]
        sizes = {"K": 2, "L": self.L, "H": self.H, "D": self.D, "p": self.ps}
        want = [sizes.get(a) for a in self.labels]
        if self.buf.ndim != len(self.labels) or any(
                w is not None and w != n for w, n in zip(want, self.buf.shape)):
            raise NotImplementedError(
                f"kvstash: kv_buffer shape {tuple(self.buf.shape)} is not the MHA "
                f"'{self.layout}' layout {self.labels} with L={self.L} H={self.H} D={self.D} "
                f"page_size={self.ps}")
        # A flat page (get_data_page order): the buffer's axes with the page's tokens.
        self.flat_labels = self.labels.replace("S", "t").replace("P", "").replace("p", "t")
        self.flat_shape = tuple(self.ps if a == "t" else sizes[a] for a in self.flat_labels)
        self.page_elems = 2 * self.L * self.ps * self.H * self.D

    def _index(self, idx: np.ndarray):
        """(numpy index into buf of these token slots, the labels of the result)."""
        a = self.labels
        if "S" in a:
            return tuple(idx if c == "S" else slice(None) for c in a), a.replace("S", "t")
        key = tuple(idx // self.ps if c == "P" else idx % self.ps if c == "p"
                    else slice(None) for c in a)
        # numpy puts the indexed axis first when the advanced indices are not adjacent
        if a.index("p") - a.index("P") == 1:
            return key, a.replace("Pp", "t")
        return key, "t" + a.replace("P", "").replace("p", "")

    def _check(self, idx: np.ndarray, n_pages: int):
        if idx.size != n_pages * self.ps:
            raise ValueError(f"kvstash: {idx.size} host indices for {n_pages} pages of "
                             f"{self.ps} tokens")
        if idx.size and (idx.min() < 0 or idx.max() >= self._slots()):
            raise ValueError("kvstash: host index out of the pool")

    def _slots(self) -> int:
        a = self.labels
        return (self.buf.shape[a.index("S")] if "S" in a
                else self.buf.shape[a.index("P")] * self.ps)

    def gather(self, idx: np.ndarray, n_pages: int) -> np.ndarray:
        """[n_pages][L][2][ps][H][D], contiguous (a copy)."""
        self._check(idx, n_pages)
        key, got = self._index(idx)
        arr = self.buf[key].transpose([got.index(c) for c in _BLOCK])  # [L][2][n*ps][H][D]
        arr = arr.reshape(self.L, 2, n_pages, self.ps, self.H, self.D)
        return np.ascontiguousarray(arr.transpose(2, 0, 1, 3, 4, 5))

    def scatter(self, idx: np.ndarray, blocks: np.ndarray):
        """Writes [n][L][2][ps][H][D] blocks to the token slots idx (n*ps of them)."""
        n = blocks.shape[0]
        self._check(idx, n)
        if blocks.dtype != self.buf.dtype:  # bf16: uint16 bits from kvstash, int16 here
            blocks = blocks.view(self.buf.dtype)
        key, got = self._index(idx)
        arr = blocks.transpose(1, 2, 0, 3, 4, 5).reshape(self.L, 2, n * self.ps, self.H,
                                                         self.D)
        self.buf[key] = arr.transpose([_BLOCK.index(c) for c in got])

    def block_of_flat(self, flat) -> np.ndarray:
        a = _np(flat).reshape(self.flat_shape)
        return np.ascontiguousarray(a.transpose([self.flat_labels.index(c) for c in _BLOCK]))

    def flat_of_block(self, block: np.ndarray) -> np.ndarray:
        b = block.reshape(self.L, 2, self.ps, self.H, self.D)
        return b.transpose([_BLOCK.index(c) for c in self.flat_labels]).reshape(-1)


# ---------------------------------------------------------------------------------- backend
class KvstashHiCacheStorage(HiCacheStorage):
    """SGLang HiCache storage backend over kvstashd (see the module docstring).

    SGLang's dynamic loader constructs it as KvstashHiCacheStorage(storage_config, kwargs)
    and then calls register_mem_pool_host(host_pool), which creates or checks the namespace.
    """

    def __init__(self, storage_config=None, kwargs: Optional[dict] = None):
        self.storage_config = storage_config
        self.cfg = KvstashHiCacheConfig.from_storage_config(storage_config, kwargs)
        if getattr(storage_config, "is_mla_model", False):
            raise NotImplementedError("kvstash: MLA models are not supported")
        self._client: Optional[Client] = None
        self._client_lock = threading.Lock()
        self._pool: Optional[_Pool] = None
        self.mem_pool_host = None
        log.info("kvstash HiCache storage: target %s namespace %s", self.cfg.target,
                 self.cfg.namespace)

    # ------------------------------------------------------------------ lifetime
    @property
    def client(self) -> Client:
        with self._client_lock:
            if self._client is None:
                self._client = Client(self.cfg.target, token=self.cfg.token,
                                      timeout_ms=self.cfg.timeout_ms,
                                      shared_memory_bytes=self.cfg.shared_memory_bytes)
            return self._client

    def close(self):
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def register_mem_pool_host(self, mem_pool_host):
        """Keeps the host pool and makes sure the namespace exists with its shape."""
        pool = _Pool(mem_pool_host)
        self.mem_pool_host = mem_pool_host
        self._pool = pool
        self._ensure_namespace()

    def _ensure_namespace(self):
        p = self._pool
        self.client.open_namespace(self.cfg.namespace, p.L, p.H, p.D, p.ps, p.dtype,
                                   what="this host pool (block_tokens = page_size)",
                                   key_codec=self.cfg.key_codec,
                                   value_codec=self.cfg.value_codec)

    def _need_pool(self) -> _Pool:
        if self._pool is None:
            raise RuntimeError("kvstash: register_mem_pool_host was not called")
        return self._pool

    # ------------------------------------------------------------------ existence
    def exists(self, key) -> bool:
        try:
            return bool(self.client.exists(self.cfg.namespace, [key_of_page_hash(key)])[0])
        except KvstashError as e:
            log.warning("kvstash: exists failed: %s", e)
            return False

    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        """How many leading keys are stored (one Lookup)."""
        if not keys:
            return 0
        try:
            prefix, _ = self.client.lookup(self.cfg.namespace,
                                           [key_of_page_hash(k) for k in keys])
            return prefix
        except KvstashError as e:
            log.warning("kvstash: lookup of %d pages failed: %s", len(keys), e)
            return 0

    # ------------------------------------------------------------------ zero-copy (v1)
    def batch_get_v1(self, keys: List[str], host_indices, extra_info=None) -> List[bool]:
        """Fetches the pages (one GetMany) into the host pool at host_indices; per key,
        whether it was found and written."""
        pool = self._need_pool()
        if not keys:
            return []
        idx = _indices(host_indices)
        try:
            pool._check(idx, len(keys))
            got = self.client.get_many(self.cfg.namespace,
                                       [key_of_page_hash(k) for k in keys])
        except (KvstashError, ValueError) as e:
            log.warning("kvstash: get of %d pages failed: %s", len(keys), e)
            return [False] * len(keys)
        ok = [b is not None and b.shape[2] == pool.ps for b in got]
        hit = [i for i, o in enumerate(ok) if o]
        if hit:
            slots = idx.reshape(len(keys), pool.ps)[hit].reshape(-1)
            pool.scatter(slots, np.stack([got[i] for i in hit]))
        return ok

    def batch_set_v1(self, keys: List[str], host_indices, extra_info=None) -> List[bool]:
        """Stores the pages at host_indices under keys (one PutMany); per key, success."""
        pool = self._need_pool()
        if not keys:
            return []
        idx = _indices(host_indices)
        try:
            blocks = pool.gather(idx, len(keys))
            res = self.client.put_many(self.cfg.namespace,
                                       zip([key_of_page_hash(k) for k in keys], blocks))
        except (KvstashError, ValueError) as e:
            log.warning("kvstash: put of %d pages failed: %s", len(keys), e)
            return [False] * len(keys)
        for k, r in zip(keys, res):
            if isinstance(r, KvstashError):
                log.warning("kvstash: put of page %s failed: %s", k, r)
        return [not isinstance(r, KvstashError) for r in res]

    # ------------------------------------------------------------------ flat pages
    def batch_get(self, keys: List[str], target_locations: Optional[Sequence] = None,
                  target_sizes=None) -> List[Any]:
        """Fetches pages (one GetMany) as flat pages in the pool's get_data_page order:
        written into target_locations[i] when given (and returned), else new arrays; None
        for an absent page."""
        pool = self._need_pool()
        if not keys:
            return []
        try:
            got = self.client.get_many(self.cfg.namespace,
                                       [key_of_page_hash(k) for k in keys])
        except KvstashError as e:
            log.warning("kvstash: get of %d pages failed: %s", len(keys), e)
            return [None] * len(keys)
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        out = []
        for b, t in zip(got, targets):
            if b is None or b.shape[2] != pool.ps:
                out.append(None)
                continue
            flat = pool.flat_of_block(b)
            if t is None:
                out.append(np.ascontiguousarray(flat))
                continue
            dst = _np(t).reshape(-1)
            if dst.size != flat.size:
                log.warning("kvstash: target of %d elements for a page of %d", dst.size,
                            flat.size)
                out.append(None)
                continue
            dst[...] = flat.view(dst.dtype)
            out.append(t)
        return out

    def get(self, key, target_location=None, target_sizes=None):
        return self.batch_get([key], [target_location] if target_location is not None
                              else None)[0]

    def batch_set(self, keys: List[str], values: Optional[Sequence] = None,
                  target_locations=None, target_sizes=None) -> bool:
        """Stores flat pages (get_data_page order) under keys in one PutMany; True if all
        were stored."""
        pool = self._need_pool()
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            return False
        try:
            blocks = [pool.block_of_flat(v) for v in values]
            res = self.client.put_many(self.cfg.namespace,
                                       zip([key_of_page_hash(k) for k in keys], blocks))
        except (KvstashError, ValueError) as e:
            log.warning("kvstash: put of %d pages failed: %s", len(keys), e)
            return False
        return not any(isinstance(r, KvstashError) for r in res)

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        if value is None:
            return False
        return self.batch_set([key], [value])

    # ------------------------------------------------------------------ housekeeping
    def delete(self, key) -> bool:
        try:
            return self.client.delete(self.cfg.namespace, [key_of_page_hash(key)]) == 1
        except KvstashError as e:
            log.warning("kvstash: delete failed: %s", e)
            return False

    def clear(self) -> bool:
        """Drops every page of the namespace (drop, then create it again)."""
        try:
            self.client.drop_namespace(self.cfg.namespace)
        except KvstashError as e:
            if e.status != "NOT_FOUND":
                log.warning("kvstash: clear failed: %s", e)
                return False
        if self._pool is not None:
            try:
                self._ensure_namespace()
            except (KvstashError, ValueError) as e:
                log.warning("kvstash: clear could not create the namespace again: %s", e)
                return False
        return True

    def get_stats(self):
        return None
