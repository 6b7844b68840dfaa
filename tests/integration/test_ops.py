"""Lookup, Exists, Delete, ListNamespaces, Stats, DropNamespace against a real daemon."""
import grpc
import pytest

import kvs
from kvs import TIER_HOST, TIER_NONE, pb


@pytest.fixture(scope="module")
def d(module_daemon):
    return module_daemon(host_capacity="64M")


def keys_req(ns, keys):
    return pb.KeysRequest(namespace=ns, keys=keys)


def empty_keys(rpc, ns):
    """Calls rpc with an empty key list: returns the reply, or None if it was refused
    with INVALID_ARGUMENT naming "keys"."""
    try:
        return rpc(keys_req(ns, []), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert "keys" in e.details(), e.details()
        return None


def list_ns(d):
    return {n.spec.name: n for n in
            d.admin.ListNamespaces(pb.ListNamespacesRequest(), timeout=10).namespaces}


def test_lookup_prefix_and_tiers(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=1, D=16, T=4))
    keys = [f"seq-{i}".encode() for i in range(6)]
    for i in (0, 1, 2, 4):  # a hole at 3
        kvs.put(d.stub, ns.name, keys[i], 4, ns.payload(4, seed=i))
    r = d.stub.Lookup(keys_req(ns.name, keys), timeout=10)
    assert r.prefix_blocks == 3
    assert list(r.tiers) == [TIER_HOST, TIER_HOST, TIER_HOST, TIER_NONE, TIER_HOST, TIER_NONE]

    r = d.stub.Lookup(keys_req(ns.name, [keys[5]] + keys[:3]), timeout=10)
    assert r.prefix_blocks == 0
    assert list(r.tiers) == [TIER_NONE, TIER_HOST, TIER_HOST, TIER_HOST]

    r = d.stub.Lookup(keys_req(ns.name, keys[:3]), timeout=10)
    assert r.prefix_blocks == 3 and list(r.tiers) == [TIER_HOST] * 3

    # No keys: either an empty answer or INVALID_ARGUMENT naming "keys" (the daemon
    # chose the latter); never anything else.
    r = empty_keys(d.stub.Lookup, ns.name)
    assert r is None or (r.prefix_blocks == 0 and list(r.tiers) == [])

    # The same key twice counts twice.
    r = d.stub.Lookup(keys_req(ns.name, [keys[0], keys[0], keys[3]]), timeout=10)
    assert r.prefix_blocks == 2


def test_lookup_chained_keys(d):
    """A worker's real use: the chained keys of a token sequence, the first blocks
    stored; Lookup gives the reusable prefix."""
    import struct

    import xxhash

    T = 4
    toks = list(range(1000, 1022))  # 5 full blocks + a partial one
    prev, keys = bytes(16), []
    for i in range(0, len(toks), T):
        blk = toks[i:i + T]
        prev = xxhash.xxh3_128_digest(prev + struct.pack(f"<{len(blk)}I", *blk), seed=0)
        keys.append(prev)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=T))
    for k in keys[:4]:
        kvs.put(d.stub, ns.name, k, T, ns.payload(T))
    r = d.stub.Lookup(keys_req(ns.name, keys), timeout=10)
    assert r.prefix_blocks == 4
    assert list(r.tiers) == [TIER_HOST] * 4 + [TIER_NONE] * 2


def test_exists(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=2))
    kvs.put(d.stub, ns.name, b"x", 1, ns.payload(1))
    kvs.put(d.stub, ns.name, b"z", 2, ns.payload(2))
    r = d.stub.Exists(keys_req(ns.name, [b"x", b"y", b"z", b"x"]), timeout=10)
    assert list(r.present) == [True, False, True, True]
    r = empty_keys(d.stub.Exists, ns.name)
    assert r is None or list(r.present) == []
    r = empty_keys(d.stub.Delete, ns.name)
    assert r is None or r.deleted == 0


def test_delete(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=2))
    for k in (b"a", b"b", b"c"):
        kvs.put(d.stub, ns.name, k, 2, ns.payload(2))
    r = d.stub.Delete(keys_req(ns.name, [b"a", b"nope", b"c"]), timeout=10)
    assert r.deleted == 2
    assert list(d.stub.Exists(keys_req(ns.name, [b"a", b"b", b"c"])).present) == \
        [False, True, False]
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, b"a", words="key")
    # Deleting again deletes nothing; the same key twice in one call counts once.
    assert d.stub.Delete(keys_req(ns.name, [b"a", b"c"])).deleted == 0
    assert d.stub.Delete(keys_req(ns.name, [b"b", b"b"])).deleted == 1
    assert list_ns(d)[ns.name].blocks == 0
    # A deleted key can be stored again.
    data = ns.payload(1, seed=7)
    assert not kvs.put(d.stub, ns.name, b"a", 1, data).replaced
    assert kvs.get(d.stub, ns.name, b"a").data == data


def test_list_namespaces_counts(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=32, T=8, dtype=kvs.BF16, seed=1234,
                            keys_pre_rope=True))
    info = list_ns(d)[ns.name]
    s = info.spec
    assert (s.layers, s.kv_heads, s.head_dim, s.block_tokens, s.dtype) == \
        (2, 2, 32, 8, kvs.BF16)
    assert s.seed == 1234 and s.keys_pre_rope
    assert s.key_codec == "none" and s.value_codec == "none"
    assert info.id == ns.info.id and info.id != 0
    assert info.block_bytes == kvs.block_bytes(2, 2, 32, 8)
    assert (info.blocks, info.stored_bytes, info.raw_bytes) == (0, 0, 0)

    sizes = [8, 3, 8]
    for i, t in enumerate(sizes):
        kvs.put(d.stub, ns.name, f"k{i}".encode(), t, ns.payload(t), dtype=kvs.BF16)
    info = list_ns(d)[ns.name]
    raw = sum(ns.bytes(t) for t in sizes)
    assert info.blocks == 3
    assert info.raw_bytes == raw
    assert info.stored_bytes >= raw

    d.stub.Delete(keys_req(ns.name, [b"k1"]))
    info = list_ns(d)[ns.name]
    assert info.blocks == 2 and info.raw_bytes == 2 * ns.bytes(8)


def test_namespace_ids_distinct(d):
    a = kvs.make_ns(d.admin)
    b = kvs.make_ns(d.admin)
    assert a.id != b.id


def test_stats(d):
    before = d.stats()
    host = [t for t in before.tiers if t.tier == TIER_HOST]
    assert len(host) == 1
    assert host[0].capacity_bytes == 64 << 20
    assert before.version
    ns = kvs.Ns(kvs.make_ns(d.admin, L=4, H=2, D=64, T=16))
    for i in range(3):
        kvs.put(d.stub, ns.name, bytes([i]), 16, ns.payload(16, seed=i))
    kvs.get(d.stub, ns.name, bytes([0]))
    kvs.get(d.stub, ns.name, bytes([1]))
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, b"missing")

    after = d.stats()
    h0, h1 = host[0], d.host_tier()
    assert h1.blocks == h0.blocks + 3
    assert h1.used_bytes >= h0.used_bytes + 3 * ns.bytes()
    assert h1.used_bytes <= h1.capacity_bytes
    assert h1.hits >= h0.hits + 2
    assert after.misses >= before.misses + 1
    assert after.uptime_ms >= before.uptime_ms
    mine = [n for n in after.namespaces if n.spec.name == ns.name]
    assert len(mine) == 1 and mine[0].blocks == 3 and mine[0].raw_bytes == 3 * ns.bytes()
    # Per-RPC counters: Put was called at least 3 times; Get errors counted.
    rpcs = {r.method: r for r in after.rpcs}
    put = [r for m, r in rpcs.items() if m.endswith("Put")]
    getr = [r for m, r in rpcs.items() if m.endswith("Get")]
    assert put and put[0].calls >= 3, list(rpcs)
    assert getr and getr[0].errors >= 1, list(rpcs)


def test_drop_namespace(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=1, D=16, T=4))
    other = kvs.Ns(kvs.make_ns(d.admin, L=2, H=1, D=16, T=4))
    for i in range(5):
        kvs.put(d.stub, ns.name, bytes([i]), 4, ns.payload(4))
    keep = other.payload(4, seed=9)
    kvs.put(d.stub, other.name, b"\x00", 4, keep)
    used = d.host_tier().used_bytes
    stored = list_ns(d)[ns.name].stored_bytes
    assert stored >= 5 * ns.bytes()
    r = d.admin.DropNamespace(pb.NameRequest(name=ns.name), timeout=10)
    assert r.blocks_dropped == 5
    assert ns.name not in list_ns(d)
    # Its blocks' bytes and their bookkeeping come back.
    assert d.host_tier().used_bytes == used - stored - 5 * kvs.BLOCK_META
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, b"\x00",
                     words="namespace")
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.stub.Lookup, keys_req(ns.name, [b"\x00"]),
                     words="namespace")
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.admin.DropNamespace,
                     pb.NameRequest(name=ns.name), words="namespace")
    # The other namespace is untouched; the name can be created again, empty.
    assert kvs.get(d.stub, other.name, b"\x00").data == keep
    again = kvs.make_ns(d.admin, name=ns.name, L=2, H=1, D=16, T=4)
    assert again.blocks == 0
    assert again.id != ns.info.id  # ids are fresh: blocks record the id they belong to
    assert list(d.stub.Exists(keys_req(ns.name, [b"\x00"])).present) == [False]


def test_health(d):
    h = d.health()
    assert h.status == kvs.SERVING
    assert h.version
