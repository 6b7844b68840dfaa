"""KvstashConnector: a vLLM KV connector (V1 interface) that offloads prompt KV to kvstashd.

Enable it in vLLM with

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"KvstashConnector",
        "kv_connector_module_path":"kvstash.integrations.vllm","kv_role":"kv_both",
        "kv_connector_extra_config":{"target":"unix:/run/kvstash.sock","namespace":"llama-8b",
                                     "codec":"kivi-4"}}'

with this package importable (PYTHONPATH=client/python, KVSTASH_LIB=.../libkvstash.so.0).
kv_connector_extra_config (all optional):
  target        kvstashd address; default $KVSTASH_TARGET, else 127.0.0.1:50051. A Unix
                socket (unix:PATH) on the same host lets batches go through shared memory.
  namespace     default "vllm". One namespace per model (and per tokenizer/LoRA): keys say
                nothing about the model, so two models must not share one.
  codec         key and value codec of a namespace this connector creates (default "none");
                key_codec / value_codec set them apart. An existing namespace is used as it is,
                if its shape (layers, KV heads, head_dim, block_tokens, dtype) matches.
  block_size    tokens per kvstash block; must equal vLLM's block size (default: vLLM's,
                else 16). A kvstash block is one vLLM block for all layers: [L][2][t][H][D].
  key_source    "auto" (vLLM's block hashes when the request has them, else chained token
                keys) or "tokens" (always kvstash.block_keys of the prompt).
  token, timeout_ms   bearer token and per-call deadline of the kvstash client.

Written against vLLM's source at commit 13f4ad0f55b08ca1d37d1459f50ce950feaeb547
(vllm/distributed/kv_transfer/kv_connector/v1/base.py; the example connector at 4c1654210c,
SchedulerOutput at 00e8f1fd09). It has been tested only with a driver that calls these
methods in vLLM's order on numpy paged caches (tests/integration/test_vllm_adapter.py), never
inside a running vLLM; vLLM's connector API is marked experimental and changes between
releases.

What it does. Scheduler side: get_num_new_matched_tokens asks kvstashd (one Exists call) which
full prompt blocks it holds and reports the leading present ones past vLLM's own prefix cache,
always leaving at least the prompt's last token to compute; update_state_after_alloc notes the
vLLM block ids they go to; build_connector_meta hands the loads of this step, and the full prompt
blocks this step completes that kvstashd lacks, to the workers. Worker side: start_load_kv
fetches all blocks of the step in one GetMany and scatters them layer by layer into the paged
caches; save_kv_layer gathers each layer's blocks into a staging buffer, and wait_for_save stores
them in one PutMany. With CUDA caches the staging buffers are CUDA tensors and nothing crosses
to the host in the adapter: the package moves them by CUDA IPC to a local kvstashd with its GPU
engine (encoded and decoded on the GPU), else through host memory. Only whole prompt blocks are stored and loaded (a partial last block and
generated tokens are not); loads and saves are synchronous within the step.

Keys. vLLM's block hashes (32-byte SHA-256 by default) are used as they are (bytes of 1..64;
an int or an old-style hash object is turned into bytes). vLLM seeds its hash chain from
PYTHONHASHSEED: without it the hashes differ between processes, and a restarted or second vLLM
finds nothing. Set PYTHONHASHSEED on every instance, or key_source "tokens".

Not supported (NotImplementedError at start): tensor or pipeline parallelism > 1 (each rank
would need its own namespace of H/tp heads), MLA and other caches that are not
[2][num_blocks][block_size][H][D] or [num_blocks][2][block_size][H][D] per layer. Hybrid models
(several KV cache groups) use the first group only.

Threading: vLLM makes one connector per process and role; the scheduler side is called from the
engine core's scheduling thread and the worker side from the model runner's thread, each
sequentially. The kvstash Client is thread-safe and made on first use.
"""
import contextlib
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..client import Client, KvstashError, block_keys

log = logging.getLogger(__name__)

try:  # the real base classes when vLLM is installed, so vLLM's isinstance checks pass
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)
    HAVE_VLLM = True
except Exception:  # ImportError, or a vLLM whose import fails on this host
    HAVE_VLLM = False
    import enum

    class KVConnectorRole(enum.Enum):
        """Stand-in for vLLM's: which process a connector instance serves."""
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:
        """Stand-in for vLLM's: what the scheduler side hands the workers each step."""

    class KVConnectorBase_V1:
        """Stand-in for vLLM's KVConnectorBase_V1 with the same method names, so that the
        connector imports and can be driven without vLLM. Only the plumbing vLLM's base
        provides is here; the connector methods are KvstashConnector's."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = getattr(vllm_config, "kv_transfer_config", None)
            if self._kv_transfer_config is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self):
            return self._role

        @property
        def prefer_cross_layer_blocks(self) -> bool:
            return False

        def bind_connector_metadata(self, connector_metadata):
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self):
            self._connector_metadata = None

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None

        def _get_connector_metadata(self):
            assert self._connector_metadata is not None
            return self._connector_metadata

        def handle_preemptions(self, preempted_req_ids):
            return

        def get_block_ids_with_load_errors(self):
            return set()

        def update_connector_output(self, connector_output):
            return

        def take_events(self):
            return ()

        def get_kv_connector_stats(self):
            return None

        def shutdown(self):
            return None

        @classmethod
        def get_required_kvcache_layout(cls, vllm_config):
            return None

DEFAULT_TARGET = "127.0.0.1:50051"


# ---------------------------------------------------------------------------------- config
@dataclass
class KvstashConnectorConfig:
    target: str = DEFAULT_TARGET
    namespace: str = "vllm"
    key_codec: str = "none"
    value_codec: str = "none"
    block_size: int = 16
    key_source: str = "auto"
    token: Optional[str] = None
    timeout_ms: int = 30000
    load_layers_per_call: int = 0   # 0: a quarter of the model's layers per GetMany

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "KvstashConnectorConfig":
        ktc = getattr(vllm_config, "kv_transfer_config", None)
        extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
        vllm_bs = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
        bs = int(extra.get("block_size") or vllm_bs or 16)
        if vllm_bs and bs != int(vllm_bs):
            raise ValueError(f"kvstash: block_size {bs} differs from vLLM's block size "
                             f"{vllm_bs}; a kvstash block is one vLLM block")
        codec = extra.get("codec", "none")
        cfg = cls(target=extra.get("target") or os.environ.get("KVSTASH_TARGET") or
                  DEFAULT_TARGET,
                  namespace=extra.get("namespace", "vllm"),
                  key_codec=extra.get("key_codec", codec),
                  value_codec=extra.get("value_codec", codec),
                  block_size=bs, key_source=extra.get("key_source", "auto"),
                  token=extra.get("token"), timeout_ms=int(extra.get("timeout_ms", 30000)),
                  load_layers_per_call=int(extra.get("load_layers_per_call", 0)))
        if cfg.load_layers_per_call < 0:
            raise ValueError(f"kvstash: load_layers_per_call must be >= 0, got "
                             f"{cfg.load_layers_per_call}")
        if cfg.key_source not in ("auto", "tokens"):
            raise ValueError(f"kvstash: key_source is 'auto' or 'tokens', got "
                             f"{cfg.key_source!r}")
        par = getattr(vllm_config, "parallel_config", None)
        for what in ("tensor_parallel_size", "pipeline_parallel_size"):
            if int(getattr(par, what, 1) or 1) > 1:
                raise NotImplementedError(f"kvstash: KvstashConnector does not support "
                                          f"{what} > 1 yet")
        return cfg


# ---------------------------------------------------------------------------------- metadata
@dataclass
class Transfer:
    """Blocks of one request to move this step: keys[i] <-> vLLM block block_ids[i]."""
    req_id: str
    keys: List[bytes]
    block_ids: List[int]


@dataclass
class KvstashConnectorMetadata(KVConnectorMetadata):
    loads: List[Transfer] = field(default_factory=list)
    saves: List[Transfer] = field(default_factory=list)


@dataclass
class _SchedReq:
    keys: List[bytes]           # one per full prompt block
    present: List[bool]         # per key, as kvstashd answered at the last lookup
    computed: int = 0           # vLLM's local prefix hit at the last lookup (tokens)
    block_ids: List[int] = field(default_factory=list)
    planned: int = 0            # full blocks [0, planned) are saved, present, or planned


# ---------------------------------------------------------------------------------- helpers
def key_of_hash(h) -> bytes:
    """A kvstash key (1..64 bytes) from one of vLLM's block hashes: bytes as they are (vLLM
    >= 0.10: BlockHash is bytes), an int as 32 big-endian bytes, an old BlockHash named tuple
    by its hash_value; anything longer than 64 bytes is shortened with BLAKE2b-256."""
    h = getattr(h, "hash_value", h)
    if isinstance(h, (bytes, bytearray, memoryview)):
        b = bytes(h)
    elif isinstance(h, int):
        b = (h & ((1 << 256) - 1)).to_bytes(32, "big")
    elif isinstance(h, str):
        b = h.encode()
    else:
        b = repr(h).encode()
    if not 1 <= len(b) <= 64:
        b = hashlib.blake2b(b, digest_size=32).digest()
    return b


def _block_ids(blocks) -> List[int]:
    """vLLM block ids from a KVCacheBlocks (first KV cache group), a tuple of per-group lists,
    or a plain list."""
    if hasattr(blocks, "get_block_ids"):
        blocks = blocks.get_block_ids()
    if blocks is None:
        return []
    blocks = list(blocks)
    if blocks and isinstance(blocks[0], (list, tuple)):
        blocks = list(blocks[0])
    return [int(b) for b in blocks]


def _natural(name: str):
    """Sort key putting model.layers.10 after model.layers.9: a block's layer order must be
    the same in every process that reads it."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _is_torch(t) -> bool:
    return hasattr(t, "is_cuda") and hasattr(t, "device")


class _Layer:
    """One layer's paged cache: gathers and scatters whole blocks as [n][2][t][H][D] arrays.
    kv_first: vLLM's FlashAttention layout [2][num_blocks][t][H][D]; else FlashInfer's
    [num_blocks][2][t][H][D]. numpy arrays and torch tensors are taken; a CUDA cache's blocks
    stay on its GPU (gathered into, and scattered from, a CUDA tensor: no host copy)."""

    def __init__(self, name, cache):
        shape = tuple(int(s) for s in cache.shape)
        if len(shape) != 5:
            raise NotImplementedError(
                f"kvstash: layer {name}: a cache of shape {shape} is not supported (MLA or "
                f"another layout); expected [2][num_blocks][block_size][H][D]")
        self.kv_first = shape[0] == 2
        if not self.kv_first and shape[1] != 2:
            raise ValueError(f"kvstash: layer {name}: no K/V axis of 2 in shape {shape}")
        self.num_blocks = shape[1] if self.kv_first else shape[0]
        self.block_shape = shape[2:]                     # (t, H, D)
        self.dtype = _dtype_name(cache)
        self.name = name

    def gather(self, cache, ids) -> np.ndarray:
        if _is_torch(cache):
            import torch
            idx = torch.as_tensor(ids, dtype=torch.long, device=cache.device)
            return (cache[:, idx].transpose(0, 1) if self.kv_first else cache[idx]).contiguous()
        a = np.asarray(cache)
        return np.moveaxis(a[:, ids], 0, 1) if self.kv_first else a[ids]

    def scatter(self, cache, ids, data):
        if _is_torch(cache):
            import torch
            if _is_torch(data):  # a load into torch buffers: already on the cache's device
                src_t = data.to(cache.device)
            else:
                src = np.ascontiguousarray(data)
                if cache.dtype == torch.bfloat16:
                    src_t = torch.from_numpy(src.view(np.int16)).view(torch.bfloat16)
                else:
                    src_t = torch.from_numpy(src)
                src_t = src_t.to(cache.device, non_blocking=False)
            idx = torch.as_tensor(ids, dtype=torch.long, device=cache.device)
            if self.kv_first:
                cache[:, idx] = src_t.transpose(0, 1)
            else:
                cache[idx] = src_t
            return
        if self.kv_first:
            cache[:, ids] = np.moveaxis(data, 1, 0)
        else:
            cache[ids] = data


def _dtype_name(cache) -> str:
    d = str(cache.dtype)
    if d in ("float16", "torch.float16"):
        return "fp16"
    if d in ("torch.bfloat16", "uint16", "int16"):  # numpy holds bf16 as raw 16-bit words
        return "bf16"
    raise NotImplementedError(f"kvstash: KV cache dtype {d} is not supported (fp16, bf16)")


class _Load:
    """One step's load, run on its own thread: for each group of layers, one GetMany of the
    group's part of every block (into host memory: the shared-memory region or gRPC), then
    each layer scattered into its paged cache; layer l's event is set once it is written.
    For CUDA caches the scatters are queued on a side stream and a CUDA event per layer is
    what the forward pass's stream waits on (wait_layer), so the copies overlap compute.

    Blocks absent from any group (evicted mid-load) end in `errors`; their slots may hold
    some layers, and vLLM recomputes them whole."""

    def __init__(self, conn, keys, ids):
        self.conn, self.keys, self.ids = conn, keys, ids
        n_layers = len(conn._layers)
        per = conn.cfg.load_layers_per_call or max(1, (n_layers + 3) // 4)
        self.groups = [(b, min(b + per, n_layers)) for b in range(0, n_layers, per)]
        self.done = [threading.Event() for _ in range(n_layers)]
        self.cuda_events = [None] * n_layers
        self.errors: set = set()
        self.failure: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="kvstash-load", daemon=True)
        cache0 = conn._caches[conn._layers[0].name]
        self.stream, self.device = None, None
        if _is_torch(cache0) and cache0.is_cuda:
            import torch
            self.device = cache0.device
            self.stream = torch.cuda.Stream(device=cache0.device)
            # The caches were written by work already queued on the current stream (a
            # previous step); the side stream's copies go after it.
            self.stream.wait_stream(torch.cuda.current_stream(cache0.device))

    def start(self):
        self.thread.start()

    def _fetch(self, b: int, e: int):
        """Layers [b, e) of every block: into host arrays for numpy caches; for torch caches
        into one tensor [n][e-b][2][t][H][D] on the caches' device, returned with the list
        (CUDA: on the side stream; the daemon decodes straight into it by CUDA IPC where it
        can, else the package copies it up)."""
        conn = self.conn
        cache0 = conn._caches[conn._layers[0].name]
        if not _is_torch(cache0):
            return conn.client.get_many(conn.cfg.namespace, self.keys, layers=(b, e)), None
        import torch
        with (torch.cuda.stream(self.stream) if self.stream is not None  # fills on it
              else contextlib.nullcontext()):
            buf = torch.empty((len(self.keys), e - b, 2) + conn._layers[0].block_shape,
                              dtype=cache0.dtype, device=cache0.device)
            return conn.client.get_many(conn.cfg.namespace, self.keys, layers=(b, e),
                                        out=list(buf.unbind(0))), buf

    def _run(self):
        conn = self.conn
        try:
            for b, e in self.groups:
                buf = None
                try:
                    got, buf = self._fetch(b, e)
                except (KvstashError, OSError) as ex:
                    log.warning("kvstash: loading layers [%d, %d) of %d blocks failed: %s",
                                b, e, len(self.keys), ex)
                    got = [None] * len(self.keys)
                dst, sel = [], []
                for i, (blk_id, blk) in enumerate(zip(self.ids, got)):
                    if blk is None or blk.shape[2] != conn.cfg.block_size or \
                            blk_id in self.errors:
                        self.errors.add(blk_id)
                    else:
                        dst.append(blk_id)
                        sel.append(i)
                stacked = None                                    # [n][e-b][2][t][H][D]
                if dst and buf is not None:
                    stacked = buf if len(sel) == len(got) else buf[sel]
                elif dst:
                    stacked = np.stack([got[i] for i in sel])
                for l in range(b, e):
                    if dst:
                        self._scatter(l, dst, stacked[:, l - b])
                    self.done[l].set()
        except BaseException as ex:  # noqa: BLE001 (re-raised on the forward's thread)
            self.failure = ex
            self.errors |= set(self.ids)
        finally:
            for ev in self.done:
                ev.set()

    def _scatter(self, l, ids, data):
        layer = self.conn._layers[l]
        cache = self.conn._caches[layer.name]
        if self.stream is None:
            layer.scatter(cache, ids, data)
            return
        import torch
        with torch.cuda.stream(self.stream):
            layer.scatter(cache, ids, data)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.cuda_events[l] = ev

    def wait_layer(self, l: Optional[int]):
        if l is None:
            return
        timeout = self.conn.cfg.timeout_ms / 1000 * (len(self.groups) + 1)
        if not self.done[l].wait(timeout):
            raise TimeoutError(f"kvstash: layer {l} did not load within {timeout:.0f} s")
        if self.failure is not None:
            raise RuntimeError("kvstash: the KV load failed") from self.failure
        ev = self.cuda_events[l]
        if ev is not None:
            import torch
            torch.cuda.current_stream(self.device).wait_event(ev)

    def join(self):
        self.thread.join()
        if self.stream is not None:
            self.stream.synchronize()


# ---------------------------------------------------------------------------------- connector
class KvstashConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by kvstashd; see the module docstring."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        except TypeError:  # vLLM before kv_cache_config was a constructor argument
            super().__init__(vllm_config, role)
        self.cfg = KvstashConnectorConfig.from_vllm_config(vllm_config)
        self._client: Optional[Client] = None
        # scheduler side
        self._reqs: Dict[str, _SchedReq] = {}
        self._loads: List[Transfer] = []
        # worker side
        self._layers: List[_Layer] = []
        self._index: Dict[str, int] = {}
        self._caches: Dict[str, Any] = {}
        self._stage: Optional[np.ndarray] = None
        self._staged: set = set()
        self._load_errors: set = set()
        self._load: Optional[_Load] = None
        log.info("kvstash connector (%s): target %s namespace %s block_size %d", role,
                 self.cfg.target, self.cfg.namespace, self.cfg.block_size)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.cfg.target, token=self.cfg.token,
                                  timeout_ms=self.cfg.timeout_ms)
        return self._client

    def shutdown(self):
        self._join_load()
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ scheduler side
    def _keys_for(self, request) -> List[bytes]:
        bs = self.cfg.block_size
        tokens = list(getattr(request, "prompt_token_ids", None) or [])
        full = len(tokens) // bs
        if full == 0:
            return []
        hashes = getattr(request, "block_hashes", None)
        if self.cfg.key_source == "auto" and hashes is not None and len(hashes) >= full:
            return [key_of_hash(h) for h in list(hashes)[:full]]
        return block_keys(tokens, bs)[:full]

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int
                                   ) -> Tuple[int, bool]:
        """Tokens kvstashd can supply past vLLM's own prefix hit: the leading present blocks
        from num_computed_tokens on, times block_size, never reaching the prompt's last token
        (vLLM must compute at least one). Loads are synchronous (False). On any kvstash error
        it answers 0: the cache is an optimisation, never a reason to fail a request."""
        bs = self.cfg.block_size
        keys = self._keys_for(request)
        n_prompt = len(getattr(request, "prompt_token_ids", None) or [])
        loadable = min(len(keys), max(0, n_prompt - 1) // bs)
        st = self._reqs.get(request.request_id)
        if st is None or st.keys != keys:
            st = self._reqs[request.request_id] = _SchedReq(keys, [False] * len(keys))
        st.computed = num_computed_tokens
        if not keys:
            return 0, False
        try:
            # One Exists over the whole prompt: the leading run answers this call, the rest
            # tells build_connector_meta which blocks need not be stored again.
            st.present = list(self.client.exists(self.cfg.namespace, keys))
        except (KvstashError, OSError) as e:
            log.warning("kvstash: lookup of request %s failed, computing it: %s",
                        request.request_id, e)
            st.present = [False] * len(keys)
            return 0, False
        if num_computed_tokens % bs:  # vLLM's local hits are whole blocks; be safe if not
            return 0, False
        first = num_computed_tokens // bs
        n = 0
        while first + n < loadable and st.present[first + n]:
            n += 1
        return n * bs, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.block_ids = _block_ids(blocks)
        if num_external_tokens <= 0:
            return
        bs = self.cfg.block_size
        first, n = st.computed // bs, num_external_tokens // bs
        ids = st.block_ids[first:first + n]
        if len(ids) < n:
            raise ValueError(f"kvstash: request {request.request_id}: {len(st.block_ids)} "
                             f"blocks allocated, {first + n} needed for the external tokens")
        self._loads.append(Transfer(request.request_id, st.keys[first:first + n], ids))

    def _plan_save(self, meta, req_id, st: _SchedReq, done_tokens: int):
        full = min(done_tokens // self.cfg.block_size, len(st.keys), len(st.block_ids))
        todo = [j for j in range(st.planned, full) if not st.present[j]]
        if todo:
            meta.saves.append(Transfer(req_id, [st.keys[j] for j in todo],
                                       [st.block_ids[j] for j in todo]))
        st.planned = max(st.planned, full)

    def build_connector_meta(self, scheduler_output) -> KvstashConnectorMetadata:
        """This step's loads (from update_state_after_alloc) and saves: the full prompt blocks
        that this step's tokens complete and kvstashd lacks. Resets the pending loads."""
        meta = KvstashConnectorMetadata(loads=self._loads)
        self._loads = []
        sched = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = _block_ids(new.block_ids)
            self._plan_save(meta, new.req_id, st,
                            new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        for i, rid in enumerate(getattr(cached, "req_ids", ()) or ()):
            st = self._reqs.get(rid)
            if st is None or st.planned >= len(st.keys):
                continue  # nothing left to store: decode steps cost nothing here
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                resumed = rid in (getattr(cached, "resumed_req_ids", None) or ())
                if not resumed and hasattr(cached, "resumed_from_preemption"):
                    resumed = bool(cached.resumed_from_preemption[i])
                ids = _block_ids(new_ids)
                st.block_ids = ids if resumed else st.block_ids + ids
            self._plan_save(meta, rid, st, cached.num_computed_tokens[i] + sched.get(rid, 0))
        return meta

    def request_finished(self, request, block_ids) -> Tuple[bool, Optional[dict]]:
        """Saves finish inside the step (wait_for_save), so the blocks can be freed now."""
        self._reqs.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: Dict[str, Any]):
        """Takes each layer's paged cache and makes sure the namespace exists with this
        model's shape: layers in natural order of their names, K and V heads, head_dim,
        block_size tokens, the caches' dtype."""
        names = sorted(kv_caches, key=_natural)
        if not names:
            raise ValueError("kvstash: register_kv_caches got no layers")
        layers = [_Layer(n, kv_caches[n]) for n in names]
        first = layers[0]
        for other in layers[1:]:
            if (other.block_shape, other.dtype, other.num_blocks) != (
                    first.block_shape, first.dtype, first.num_blocks):
                raise NotImplementedError(
                    f"kvstash: layer {other.name} has blocks {other.block_shape} "
                    f"{other.dtype}, layer "
                    f"{first.name} {first.block_shape} {first.dtype}: layers must agree")
        t, H, D = first.block_shape
        if t != self.cfg.block_size:
            raise ValueError(f"kvstash: the caches hold {t} tokens per block, block_size is "
                             f"{self.cfg.block_size}")
        self._layers, self._caches = layers, dict(kv_caches)
        self._index = {n: i for i, n in enumerate(names)}
        self._ensure_namespace(len(layers), H, D, t, first.dtype)

    def _ensure_namespace(self, L, H, D, t, dtype):
        self.client.open_namespace(self.cfg.namespace, L, H, D, t, dtype, what="this model",
                                   key_codec=self.cfg.key_codec,
                                   value_codec=self.cfg.value_codec)

    def _meta(self) -> Optional[KvstashConnectorMetadata]:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, KvstashConnectorMetadata) else None

    def start_load_kv(self, forward_context, **kwargs):
        """Starts loading every block this step loads, in the background, layer group by
        layer group (one GetMany of those layers' part of every block per group, in model
        order), so that the forward pass runs layer 0's attention while later layers
        arrive. wait_for_layer_load waits for one layer. A block kvstashd no longer has
        (evicted since the lookup) is reported by get_block_ids_with_load_errors, and
        vLLM recomputes it."""
        self._join_load()
        self._load_errors = set()
        meta = self._meta()
        if meta is None or not meta.loads:
            return
        keys = [k for tr in meta.loads for k in tr.keys]
        ids = [b for tr in meta.loads for b in tr.block_ids]
        self._load = _Load(self, keys, ids)
        self._load.start()

    def _join_load(self):
        """Waits for the step's load to end (every layer written or failed)."""
        if self._load is not None:
            self._load.join()
            self._load_errors |= self._load.errors
            self._load = None

    def wait_for_layer_load(self, layer_name: str):
        """Returns once layer_name's blocks of this step are in its cache; for a CUDA cache,
        once the copy into it is ordered before the work queued next on the current stream."""
        if self._load is not None:
            self._load.wait_layer(self._index.get(layer_name))

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs):
        """Copies this layer's part of the blocks this step saves into the staging buffer
        [n][L][2][t][H][D]; wait_for_save stores them once every layer is in."""
        meta = self._meta()
        l = self._index.get(layer_name)
        if meta is None or not meta.saves or l is None:
            return
        ids = [b for tr in meta.saves for b in tr.block_ids]
        if self._stage is None:
            layer = self._layers[l]
            shape = (len(ids), len(self._layers), 2) + layer.block_shape
            if _is_torch(kv_layer):  # on the cache's device (a GPU's: PutMany by CUDA IPC)
                import torch
                self._stage = torch.empty(shape, dtype=kv_layer.dtype, device=kv_layer.device)
            else:
                self._stage = np.empty(shape, np.float16 if layer.dtype == "fp16" else np.uint16)
            self._staged = set()
        self._stage[:, l] = self._layers[l].gather(kv_layer, ids)
        self._staged.add(l)

    def wait_for_save(self):
        """Stores the staged blocks in one PutMany. A block kvstashd refuses is logged and
        skipped; it is only not cached."""
        stage, staged = self._stage, self._staged
        self._stage, self._staged = None, set()
        meta = self._meta()
        if stage is None or meta is None:
            return
        if len(staged) != len(self._layers):
            log.warning("kvstash: %d of %d layers were saved this step; not storing",
                        len(staged), len(self._layers))
            return
        keys = [k for tr in meta.saves for k in tr.keys]
        try:
            res = self.client.put_many(self.cfg.namespace, zip(keys, stage))
        except (KvstashError, OSError) as e:
            log.warning("kvstash: storing %d blocks failed: %s", len(keys), e)
            return
        bad = [r for r in res if isinstance(r, KvstashError)]
        if bad:
            log.warning("kvstash: %d of %d blocks not stored, first: %s", len(bad), len(res),
                        bad[0])

    def get_finished(self, finished_req_ids):
        return None, None

    def get_block_ids_with_load_errors(self):
        self._join_load()
        return set(self._load_errors)
