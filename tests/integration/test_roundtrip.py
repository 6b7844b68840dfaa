"""Put/Get round trips through the Python client: byte-exact for several layouts, dtypes,
partial blocks and chunkings; layer ranges; replacement."""
import pytest

import kvs
from kvs import BF16, FP16, TIER_HOST


@pytest.fixture(scope="module")
def d(module_daemon):
    return module_daemon(host_capacity="512M")


LAYOUTS = [
    # (L, H, D, T, dtype, t)
    pytest.param(1, 1, 16, 1, FP16, 1, id="L1H1D16T1"),
    pytest.param(4, 2, 64, 16, FP16, 16, id="L4H2D64T16-fp16"),
    pytest.param(4, 2, 64, 16, BF16, 16, id="L4H2D64T16-bf16"),
    pytest.param(32, 8, 128, 16, FP16, 16, id="L32H8D128T16-2MiB"),
    pytest.param(32, 8, 128, 16, BF16, 16, id="L32H8D128T16-2MiB-bf16"),
    pytest.param(4, 2, 64, 16, FP16, 5, id="partial-t5"),
    pytest.param(3, 1, 32, 8, BF16, 1, id="partial-t1-bf16"),
    pytest.param(32, 8, 128, 16, FP16, 15, id="partial-t15-large"),
]


def g_tier_matches(d, ns, key, tier):
    return list(d.stub.Lookup(kvs.pb.KeysRequest(namespace=ns.name, keys=[key])).tiers) == [tier]


@pytest.mark.parametrize("L,H,D,T,dtype,t", LAYOUTS)
def test_roundtrip_layouts(d, L, H, D, T, dtype, t):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, dtype=dtype))
    assert ns.info.block_bytes == kvs.block_bytes(L, H, D, T, dtype)
    data = ns.payload(t, seed=kvs.seed_of(L, H, D, T, dtype, t))
    key = b"block-" + bytes([L, H, t])
    r = kvs.put(d.stub, ns.name, key, t, data, dtype=dtype, chunk=256 << 10)
    # The GPU tier when the daemon has one (a GPU machine), the host tier otherwise.
    assert r.tier == (kvs.pb.TIER_GPU if d.has_gpu_tier() else TIER_HOST)
    assert g_tier_matches(d, ns, key, r.tier)
    assert r.raw_bytes == len(data)
    assert r.encoded_bytes >= len(data)  # codec "none" stores the bytes as given
    assert not r.replaced
    g = kvs.get(d.stub, ns.name, key)
    h = g.header
    assert (h.tokens, h.dtype, h.layer_begin, h.layer_end) == (t, dtype, 0, L)
    assert h.total_bytes == len(data)
    assert h.format == kvs.RAW
    assert h.tier == r.tier
    assert g.data == data


@pytest.mark.parametrize("chunk", [
    pytest.param(1, id="1-byte"),
    pytest.param([1, 7, 1000, 3, 65536, 1], id="uneven"),
    pytest.param([4095, 1, 4097], id="straddle-pages"),
    pytest.param(1 << 20, id="one-chunk"),
])
def test_roundtrip_chunkings(d, chunk):
    # 1-byte chunks stream a small block; the others a 64 KiB one.
    L, H, D, T = (1, 1, 16, 4) if chunk == 1 else (4, 2, 64, 16)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    for t in (T, T - 1):
        data = ns.payload(t, seed=kvs.seed_of("chunk", t))
        key = f"k{t}".encode()
        r = kvs.put(d.stub, ns.name, key, t, data, chunk=chunk, payload_bytes=len(data))
        assert r.raw_bytes == len(data)
        assert kvs.get(d.stub, ns.name, key).data == data


def test_empty_data_chunks_are_harmless(d):
    """Zero-length data chunks in the middle of the payload add nothing."""
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=1, D=16, T=2))
    data = ns.payload(2, seed=5)
    r = kvs.put(d.stub, ns.name, b"e", 2, data, chunk=[10, 0, 100, 0, 1 << 20])
    assert r.raw_bytes == len(data)
    assert kvs.get(d.stub, ns.name, b"e").data == data


@pytest.mark.parametrize("begin,end", [(0, 1), (3, 4), (1, 3), (0, 4), (2, 0), (0, 0)])
def test_get_layer_range(d, begin, end):
    L, H, D, T, t = 4, 2, 64, 16, 7
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    data = ns.payload(t, seed=99)
    kvs.put(d.stub, ns.name, b"lr", t, data)
    g = kvs.get(d.stub, ns.name, b"lr", layer_begin=begin, layer_end=end)
    want_end = end or L
    lb = ns.layer_bytes(t)
    assert (g.header.layer_begin, g.header.layer_end) == (begin, want_end)
    assert g.header.total_bytes == (want_end - begin) * lb
    assert g.header.tokens == t
    assert g.data == data[begin * lb:want_end * lb]
    # Every chunk carries bytes of its own layer at its own offset.
    for c in g.chunks:
        assert begin <= c.layer < want_end
        assert c.data == data[c.layer * lb + c.offset:c.layer * lb + c.offset + len(c.data)]


def test_get_large_block_streams_per_layer(d):
    """A 2 MiB block comes back in chunks each within one layer (checked by kvs.get),
    and every layer of it is covered."""
    ns = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))
    data = ns.payload(16, seed=3)
    kvs.put(d.stub, ns.name, b"big", 16, data)
    g = kvs.get(d.stub, ns.name, b"big")
    assert sorted({c.layer for c in g.chunks}) == list(range(32))
    assert g.data == data


def test_put_replaces(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=32, T=8))
    a = ns.payload(8, seed=1)
    b = ns.payload(3, seed=2)
    r1 = kvs.put(d.stub, ns.name, b"same", 8, a)
    assert not r1.replaced
    assert kvs.get(d.stub, ns.name, b"same").data == a
    r2 = kvs.put(d.stub, ns.name, b"same", 3, b)
    assert r2.replaced
    g = kvs.get(d.stub, ns.name, b"same")
    assert g.header.tokens == 3
    assert g.data == b
    # One block, holding the new bytes.
    info = [n for n in d.admin.ListNamespaces(kvs.pb.ListNamespacesRequest()).namespaces
            if n.spec.name == ns.name][0]
    assert info.blocks == 1
    assert info.raw_bytes == len(b)


def test_keys_are_opaque_bytes(d):
    """Keys are bytes 1..64 long, any value: NUL, 0xFF, the 64-byte maximum, and keys that
    differ only in length are distinct blocks."""
    ns = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=2))
    keys = [b"\x00", b"\x00\x00", b"\xff" * 64, bytes(range(64)), b"a", b"a\x00"]
    for i, k in enumerate(keys):
        kvs.put(d.stub, ns.name, k, 2, ns.payload(2, seed=100 + i))
    for i, k in enumerate(keys):
        assert kvs.get(d.stub, ns.name, k).data == ns.payload(2, seed=100 + i), k


def test_same_key_in_two_namespaces(d):
    a = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=2))
    b = kvs.Ns(kvs.make_ns(d.admin, L=2, H=1, D=16, T=2, dtype=BF16))
    da, db = a.payload(2, seed=1), b.payload(1, seed=2)
    kvs.put(d.stub, a.name, b"k", 2, da)
    kvs.put(d.stub, b.name, b"k", 1, db, dtype=BF16)
    assert kvs.get(d.stub, a.name, b"k").data == da
    assert kvs.get(d.stub, b.name, b"k").data == db
