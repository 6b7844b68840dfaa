"""kvstash.integrations.sglang.KvstashHiCacheStorage against a real daemon, driven as SGLang's
HiCache cache controller drives an L3 storage backend (no SGLang here): built as the "dynamic"
loader builds it, register_mem_pool_host, then batch_exists / batch_get_v1 / batch_set_v1 (the
zero-copy path) and batch_get / batch_set on flat pages (the generic path). The host pool is a
numpy stand-in with the attributes and kv_buffer layouts of SGLang's MHATokenToKVPoolHost
(page_size 16, 4 layers, 2 KV heads, head_dim 64, 32 pages)."""
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

import kvs

kvstash = kvs.client_package()
from kvstash.integrations import sglang as kv_sglang  # noqa: E402 (the client package)

PS, L, H, D, PAGES = 16, 4, 2, 64, 32
LAYOUTS = ["page_first", "layer_first", "page_first_direct", "page_head"]


# ------------------------------------------------------------------ an SGLang-shaped driver
class HostPool:
    """Stands for SGLang's MHATokenToKVPoolHost: the attributes the backend reads, kv_buffer
    in SGLang's layout, and the flat-page methods of its generic storage path."""

    def __init__(self, layout, seed=0):
        self.layout, self.page_size, self.dtype = layout, PS, np.float16
        self.layer_num, self.head_num, self.head_dim = L, H, D
        self.size, self.page_num = PAGES * PS, PAGES
        dims = {"layer_first": (2, L, self.size, H, D), "page_first": (2, self.size, L, H, D),
                "page_first_direct": (2, PAGES, L, PS, H, D),
                "page_head": (2, PAGES, H, PS, L, D)}[layout]
        self.kv_buffer = np.random.default_rng(seed).standard_normal(dims).astype(np.float16)

    # token slot s of a buffer as [2][L][H][D], written out per layout (not shared with the
    # backend's own index arithmetic, so the two check each other)
    def token(self, buf, s):
        p, o = divmod(s, PS)
        if self.layout == "layer_first":
            return buf[:, :, s]
        if self.layout == "page_first":
            return buf[:, s]
        if self.layout == "page_first_direct":
            return buf[:, p, :, o]
        return buf[:, p, :, o].transpose(0, 2, 1, 3)  # page_head: [2][H][L][D] -> [2][L][H][D]

    def set_token(self, buf, s, v):
        p, o = divmod(s, PS)
        if self.layout == "layer_first":
            buf[:, :, s] = v
        elif self.layout == "page_first":
            buf[:, s] = v
        elif self.layout == "page_first_direct":
            buf[:, p, :, o] = v
        else:
            buf[:, p, :, o] = v.transpose(0, 2, 1, 3)

    def page_block(self, buf, page):
        """Page `page` as kvstash stores it: [L][2][PS][H][D]."""
        return np.stack([self.token(buf, page * PS + t) for t in range(PS)], axis=2
                        ).transpose(1, 0, 2, 3, 4)

    # SGLang's generic (flat page) path, as mha.py defines it
    def _page(self, index):
        if self.layout == "layer_first":
            return (slice(None), slice(None), slice(index, index + PS))
        if self.layout == "page_first":
            return (slice(None), slice(index, index + PS))
        return (slice(None), slice(index // PS, index // PS + 1))

    def get_data_page(self, index, flat=True):
        page = self.kv_buffer[self._page(index)]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return np.zeros(2 * L * PS * H * D, np.float16)

    def set_from_flat_data_page(self, index, data_page):
        dst = self.kv_buffer[self._page(index)]
        dst[...] = data_page.reshape(dst.shape)


def storage_config(**extra):
    """SGLang's HiCacheStorageConfig, as the cache controller fills it."""
    return SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                           attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                           is_page_first_layout=True, model_name="test/model", dp_rank=0,
                           dp_size=1, tp_lcm_size=None, should_split_heads=False,
                           extra_config=dict(backend_name="kvstash",
                                             module_path="kvstash.integrations.sglang",
                                             class_name="KvstashHiCacheStorage",
                                             interface_v1=1, **extra))


def make_backend(target, namespace, pool, **extra):
    """As StorageBackendFactory._create_dynamic_backend and attach_storage_backend do."""
    cls = getattr(__import__("kvstash.integrations.sglang", fromlist=["x"]),
                  "KvstashHiCacheStorage")
    b = cls(storage_config(target=target, namespace=namespace, **extra), {})
    b.register_mem_pool_host(pool)
    return b


def page_keys(tag, n):
    """SGLang's page hashes: SHA-256 hex digests."""
    return [hashlib.sha256(f"{tag}-{i}".encode()).hexdigest() for i in range(n)]


def slots(pages):
    """host_indices of whole pages: token slots, page i at [i*PS, (i+1)*PS)."""
    return np.concatenate([np.arange(p * PS, (p + 1) * PS) for p in pages]).astype(np.int64)


class Calls:
    """Counts the client's batched calls (they still go to the daemon)."""

    def __init__(self, client):
        self.n = {}
        for m in ("get_many", "put_many", "lookup", "exists"):
            real = getattr(client, m)

            def wrap(*a, _m=m, _real=real, **kw):
                self.n[_m] = self.n.get(_m, 0) + 1
                return _real(*a, **kw)
            setattr(client, m, wrap)


@pytest.fixture(scope="module")
def target(module_daemon):
    return module_daemon(host_capacity="256M").target


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_set_exists_get(target, layout):
    pool = HostPool(layout, seed=LAYOUTS.index(layout))
    b = make_backend(target, kvs.ns_name("sgl"), pool)
    with kvstash.Client(target) as c:
        ns = c.namespace(b.cfg.namespace)
        assert (ns.layers, ns.kv_heads, ns.head_dim, ns.block_tokens, ns.dtype,
                ns.key_codec) == (L, H, D, PS, "fp16", "none")
    calls = Calls(b.client)
    keys, missing = page_keys(layout, 3), page_keys(layout + "-missing", 1)[0]
    src, dst = [5, 9, 2], [20, 21, 30]
    want = [pool.page_block(pool.kv_buffer, p).copy() for p in src]

    assert b.batch_set_v1(keys, slots(src)) == [True] * 3
    assert calls.n == {"put_many": 1}
    assert b.batch_exists(keys + [missing]) == 3
    assert b.batch_exists([missing] + keys) == 0
    assert b.batch_exists([]) == 0
    assert calls.n["lookup"] == 3 - 1  # the empty list asks nothing
    assert [b.exists(k) for k in keys + [missing]] == [True, True, True, False]

    before = pool.kv_buffer.copy()
    expected = before.copy()
    for s_page, d_page in zip(src, dst):
        for t in range(PS):
            pool.set_token(expected, d_page * PS + t, pool.token(before, s_page * PS + t))
    assert b.batch_get_v1(keys, slots(dst)) == [True] * 3
    assert calls.n["get_many"] == 1
    for p, w in zip(dst, want):
        assert pool.page_block(pool.kv_buffer, p).tobytes() == w.tobytes()
    assert pool.kv_buffer.tobytes() == expected.tobytes()  # no other byte moved
    b.close()


def test_v1_get_partial_and_torch_like_indices(target):
    """A missing page is False and its slots are left as they were; the others load."""
    pool = HostPool("page_first", seed=11)
    b = make_backend(target, kvs.ns_name("sglp"), pool)
    keys = page_keys("partial", 3)
    assert b.batch_set_v1([keys[0], keys[2]], list(slots([1, 3]))) == [True, True]
    before = pool.kv_buffer.copy()
    assert b.batch_get_v1(keys, slots([10, 11, 12])) == [True, False, True]
    assert pool.page_block(pool.kv_buffer, 10).tobytes() == \
        pool.page_block(before, 1).tobytes()
    assert pool.page_block(pool.kv_buffer, 11).tobytes() == \
        pool.page_block(before, 11).tobytes()
    assert pool.page_block(pool.kv_buffer, 12).tobytes() == \
        pool.page_block(before, 3).tobytes()
    # wrong number of host indices: refused as a miss, the pool untouched
    snap = pool.kv_buffer.copy()
    assert b.batch_get_v1(keys[:2], slots([4])) == [False, False]
    assert b.batch_set_v1(keys[:2], slots([4])) == [False, False]
    assert pool.kv_buffer.tobytes() == snap.tobytes()
    b.close()


def test_lossy_codec(target):
    """kivi-2: what comes back is close to what was stored, not equal."""
    pool = HostPool("page_first", seed=3)
    b = make_backend(target, kvs.ns_name("sglq"), pool, codec="kivi-2")
    with kvstash.Client(target) as c:
        ns = c.namespace(b.cfg.namespace)
        assert (ns.key_codec, ns.value_codec) == ("kivi-2", "kivi-2")
    keys = page_keys("kivi", 2)
    want = [pool.page_block(pool.kv_buffer, p).astype(np.float32) for p in (0, 1)]
    assert b.batch_set_v1(keys, slots([0, 1])) == [True, True]
    assert b.batch_get_v1(keys, slots([6, 7])) == [True, True]
    for p, w in zip((6, 7), want):
        got = pool.page_block(pool.kv_buffer, p).astype(np.float32)
        err = np.linalg.norm(got - w) / np.linalg.norm(w)
        assert 0 < err <= 0.5, err  # tests/integration/test_codecs.py BOUNDS["kivi-2"]
    b.close()


@pytest.mark.parametrize("layout", ["layer_first", "page_head"])
def test_flat_page_path(target, layout):
    """The generic path (_generic_page_set / _generic_page_get): flat pages from
    get_data_page, batch_set, batch_get into dummy pages, set_from_flat_data_page. It stores
    the same blocks as the v1 path, so the two read each other's pages."""
    pool = HostPool(layout, seed=21)
    b = make_backend(target, kvs.ns_name("sglf"), pool)
    calls = Calls(b.client)
    keys = page_keys("flat" + layout, 3)
    want = [pool.page_block(pool.kv_buffer, p).copy() for p in (4, 5, 6)]
    assert b.batch_set(keys, [pool.get_data_page(p * PS) for p in (4, 5, 6)]) is True
    assert calls.n == {"put_many": 1}
    dummies = [pool.get_dummy_flat_data_page() for _ in range(4)]
    got = b.batch_get(keys + page_keys("absent", 1), dummies)
    assert calls.n["get_many"] == 1
    assert got[3] is None and all(g is d for g, d in zip(got[:3], dummies))
    for p, g in zip((14, 15, 16), got[:3]):
        pool.set_from_flat_data_page(p * PS, g)
    for p, w in zip((14, 15, 16), want):
        assert pool.page_block(pool.kv_buffer, p).tobytes() == w.tobytes()
    # v1 reads what the flat path stored, and the flat path what v1 stored
    assert b.batch_get_v1(keys[:1], slots([20])) == [True]
    assert pool.page_block(pool.kv_buffer, 20).tobytes() == want[0].tobytes()
    k = page_keys("v1" + layout, 1)[0]
    assert b.batch_set_v1([k], slots([7])) == [True]
    flat = b.get(k, pool.get_dummy_flat_data_page())
    assert flat.tobytes() == pool.get_data_page(7 * PS).tobytes()
    # single-page calls, delete and clear
    assert b.set(k, pool.get_data_page(8 * PS)) is True
    assert b.get(k).tobytes() == pool.get_data_page(8 * PS).tobytes()
    assert b.get(page_keys("absent", 1)[0]) is None
    assert b.set(k, None) is False
    assert b.delete(k) is True and b.exists(k) is False and b.delete(k) is False
    assert b.batch_exists(keys) == 3
    assert b.clear() is True
    assert b.batch_exists(keys) == 0
    assert b.batch_set_v1(keys[:1], slots([0])) == [True]  # the namespace is back
    b.close()


def test_keys(target):
    h = hashlib.sha256(b"page").hexdigest()
    assert kv_sglang.key_of_page_hash(h) == bytes.fromhex(h)
    assert kv_sglang.key_of_page_hash("00ff") == b"\x00\xff"
    for s in ("radix-page-0", h.upper(), "abc", "", "ab" * 65):  # non-hex, odd, too long
        assert kv_sglang.key_of_page_hash(s) == hashlib.sha256(s.encode()).digest()
    assert kv_sglang.key_of_page_hash(b"raw") == b"raw"
    assert kv_sglang.key_of_page_hash(b"x" * 65) == hashlib.sha256(b"x" * 65).digest()

    pool = HostPool("page_first", seed=5)
    b = make_backend(target, kvs.ns_name("sglk"), pool)
    assert b.batch_set_v1([h, "radix-page-0"], slots([0, 1])) == [True, True]
    with kvstash.Client(target) as c:
        assert c.exists(b.cfg.namespace, [bytes.fromhex(h),
                                          hashlib.sha256(b"radix-page-0").digest()]) == \
            [True, True]
    assert b.batch_exists(["radix-page-0"]) == 1
    b.close()


def test_config(target, monkeypatch):
    monkeypatch.setenv("KVSTASH_TARGET", "unix:/nonexistent.sock")
    sc = storage_config()
    c = kv_sglang.KvstashHiCacheConfig.from_storage_config(sc, {})
    assert (c.target, c.namespace, c.key_codec, c.value_codec) == (
        "unix:/nonexistent.sock", "sglang", "none", "none")
    monkeypatch.delenv("KVSTASH_TARGET")
    sc.extra_config = None
    assert kv_sglang.KvstashHiCacheConfig.from_storage_config(sc).target == "127.0.0.1:50051"
    sc = storage_config(namespace="m", codec="kivi-4", value_codec="none")
    sc.tp_rank, sc.tp_size, sc.pp_rank, sc.pp_size = 1, 2, 0, 2
    c = kv_sglang.KvstashHiCacheConfig.from_storage_config(sc)
    assert (c.namespace, c.key_codec, c.value_codec) == ("m.tp1of2.pp0of2", "kivi-4", "none")
    mla = storage_config()
    mla.is_mla_model = True
    with pytest.raises(NotImplementedError):
        kv_sglang.KvstashHiCacheStorage(mla, {})
    assert issubclass(kv_sglang.KvstashHiCacheStorage, kv_sglang.HiCacheStorage)

    # A namespace of another shape is refused, not overwritten.
    name = kvs.ns_name("sglx")
    with kvstash.Client(target) as cl:
        cl.create_namespace(name, layers=L, kv_heads=H, head_dim=128, block_tokens=PS)
    with pytest.raises(ValueError, match="head_dim"):
        make_backend(target, name, HostPool("page_first"))
    # Unsupported pools are refused at registration.
    bad = HostPool("page_first")
    bad.layout = "weird"
    with pytest.raises(NotImplementedError):
        make_backend(target, kvs.ns_name("sglw"), bad)
    split = HostPool("page_first")
    split.kv_buffer = [split.kv_buffer[0], split.kv_buffer[1]]
    with pytest.raises(NotImplementedError):
        make_backend(target, kvs.ns_name("sglw"), split)


def test_unreachable_daemon_is_a_miss(target):
    """A daemon that is not there makes misses and False, never an exception in SGLang's
    prefetch and backup threads."""
    pool = HostPool("page_first", seed=9)
    b = make_backend(target, kvs.ns_name("sglu"), pool)
    b.close()
    b.cfg.target, b.cfg.timeout_ms = "unix:/nonexistent/kvstash.sock", 2000
    keys = page_keys("down", 2)
    snap = pool.kv_buffer.copy()
    assert b.batch_exists(keys) == 0
    assert b.exists(keys[0]) is False
    assert b.batch_set_v1(keys, slots([0, 1])) == [False, False]
    assert b.batch_get_v1(keys, slots([2, 3])) == [False, False]
    assert b.batch_get(keys, None) == [None, None]
    assert b.batch_set(keys, [pool.get_data_page(0), pool.get_data_page(PS)]) is False
    assert pool.kv_buffer.tobytes() == snap.tobytes()
    b.close()
