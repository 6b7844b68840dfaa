"""LRU eviction in the host tier: with room for 4 blocks, storing 6 evicts the two least
recently used; blocks read recently survive; every block is either served byte-exact or
reported missing, never wrong. --eviction s3fifo keeps a re-read working set through a scan
that lru lets push it out."""
import subprocess

import grpc

import kvs
from kvs import TIER_HOST, TIER_NONE, pb

# 1 MiB blocks; the tier holds 4.5 of them, so 4 fit.
L, H, D, T = 8, 4, 128, 64
BLOCK = kvs.block_bytes(L, H, D, T)
assert BLOCK == 1 << 20
CAPACITY = 4 * BLOCK + BLOCK // 2


def present(d, ns, keys):
    return list(d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=keys), timeout=10).present)


def test_lru_eviction(daemon):
    d = daemon(host_capacity=str(CAPACITY))
    assert d.host_tier().capacity_bytes == CAPACITY
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    keys = [f"blk{i}".encode() for i in range(6)]
    datas = [ns.payload(T, seed=i) for i in range(6)]

    for i in range(4):
        kvs.put(d.stub, ns.name, keys[i], T, datas[i])
    assert present(d, ns, keys[:4]) == [True] * 4
    assert d.host_tier().evictions == 0

    # Touch blk0: it becomes the most recently used.
    assert kvs.get(d.stub, ns.name, keys[0]).data == datas[0]

    for i in (4, 5):
        r = kvs.put(d.stub, ns.name, keys[i], T, datas[i])
        assert r.tier == TIER_HOST

    # blk1 and blk2 were the least recently used.
    assert present(d, ns, keys) == [True, False, False, True, True, True]
    lk = d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=keys), timeout=10)
    assert lk.prefix_blocks == 1
    assert list(lk.tiers) == [TIER_HOST, TIER_NONE, TIER_NONE, TIER_HOST, TIER_HOST, TIER_HOST]
    for i in (1, 2):
        kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, keys[i],
                         words="key")
    for i in (0, 3, 4, 5):
        assert kvs.get(d.stub, ns.name, keys[i]).data == datas[i], keys[i]

    host = d.host_tier()
    assert host.evictions == 2
    assert host.blocks == 4
    assert host.used_bytes <= host.capacity_bytes
    info = [n for n in d.stats().namespaces if n.spec.name == ns.name][0]
    assert info.blocks == 4


def test_eviction_under_churn(daemon):
    """Many more blocks than fit, mixed sizes, reads in between: every block is served
    byte-exact or reported missing, the tier never goes over capacity, and the most
    recently written block is always there."""
    d = daemon(host_capacity=str(CAPACITY))
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    written = {}
    for i in range(24):
        t = 1 + (i * 37) % T
        k = f"c{i}".encode()
        written[k] = ns.payload(t, seed=1000 + i)
        kvs.put(d.stub, ns.name, k, t, written[k])
        assert kvs.get(d.stub, ns.name, k).data == written[k]
        if i % 3 == 0:  # read an older one if still there
            old = f"c{i // 2}".encode()
            try:
                assert kvs.get(d.stub, ns.name, old).data == written[old]
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
        host = d.host_tier()
        assert host.used_bytes <= host.capacity_bytes
    alive = 0
    for k, v in written.items():
        try:
            assert kvs.get(d.stub, ns.name, k).data == v, k
            alive += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
    assert alive >= 4
    host = d.host_tier()
    assert host.evictions == len(written) - alive
    assert host.blocks == alive


def test_tier_of_exactly_one_block(daemon):
    """A tier with room for exactly one full block: the namespace is accepted, a block
    can be replaced in place, and a second key evicts the first."""
    # One encoded `none` block, header included, and its bookkeeping.
    room = BLOCK + kvs.encoded_prefix_bytes(L) + kvs.BLOCK_META
    d = daemon(host_capacity=str(room))
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    a1, a2, b = ns.payload(T, seed=1), ns.payload(T, seed=2), ns.payload(T, seed=3)
    kvs.put(d.stub, ns.name, b"a", T, a1)
    kvs.put(d.stub, ns.name, b"a", T, a2)  # needs the old block's room
    assert kvs.get(d.stub, ns.name, b"a").data == a2
    kvs.put(d.stub, ns.name, b"b", T, b)
    assert present(d, ns, [b"a", b"b"]) == [False, True]
    assert kvs.get(d.stub, ns.name, b"b").data == b
    host = d.host_tier()
    assert host.blocks == 1 and host.used_bytes == room
    assert host.block_meta_bytes == kvs.BLOCK_META
    # Small blocks share the room (each carries its own encoded header: three quarters fit).
    for i in range(3):
        kvs.put(d.stub, ns.name, bytes([i]), T // 4, ns.payload(T // 4, seed=10 + i))
    assert present(d, ns, [bytes([i]) for i in range(3)]) == [True] * 3
    assert d.host_tier().used_bytes <= room


def test_eviction_policy_flag(daemon):
    """--eviction: a working set read again survives a scan of one-off blocks three times the
    tier's size under s3fifo, and not under lru (the default); a bad value is refused at start
    naming the flag."""
    small = str(10 * BLOCK + BLOCK // 2)  # 10 blocks fit
    for policy, survives in (("lru", False), ("s3fifo", True)):
        d = daemon(host_capacity=small, extra=["--eviction", policy, "--stats-interval", "0"])
        assert f"(eviction {policy})" in d.stderr_text()
        ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
        ws = [b"w%d" % i for i in range(3)]
        for i, k in enumerate(ws):
            kvs.put(d.stub, ns.name, k, T, ns.payload(T, seed=i))
        for i, k in enumerate(ws):
            assert kvs.get(d.stub, ns.name, k).data == ns.payload(T, seed=i)
        for i in range(30):
            kvs.put(d.stub, ns.name, b"scan%d" % i, T, ns.payload(T, seed=100 + i))
        assert present(d, ns, ws) == [survives] * 3, policy
        if survives:
            for i, k in enumerate(ws):
                assert kvs.get(d.stub, ns.name, k).data == ns.payload(T, seed=i)
        host = d.host_tier()
        assert host.blocks == 10 and host.evictions == 33 - 10, host
        d.stop()
    r = subprocess.run([kvs.KVSTASHD, "--eviction", "mru"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--eviction" in r.stderr, r
