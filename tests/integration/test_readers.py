"""A block being read stays whole while it is replaced, deleted, evicted or its namespace
dropped (store.h: readers hold a reference; eviction skips busy blocks). Each test holds
a Get stream open, reading slowly, on 8 MiB blocks, much larger than the HTTP/2 windows,
so the daemon really is in the middle of sending."""
import threading
import time

import grpc
import pytest

import kvs
from kvs import pb

L, H, D, T = 32, 8, 128, 64  # 8 MiB blocks
BLOCK = kvs.block_bytes(L, H, D, T)


class SlowGet:
    """A Get stream opened on its own channel and read one chunk at a time."""

    def __init__(self, d, ns, key):
        self.ch, stub, _ = d.stubs([("grpc.http2.bdp_probe", 0)])
        self.it = stub.Get(pb.GetRequest(namespace=ns, key=key), timeout=60)
        first = next(self.it)
        assert first.HasField("header")
        self.header = first.header
        self.chunks = [next(self.it)]

    def finish(self):
        for c in self.it:
            self.chunks.append(c)
        self.ch.close()
        kvs.check_get_chunks(self.header, self.chunks)
        return b"".join(c.data for c in self.chunks)


@pytest.fixture(scope="module")
def d(module_daemon):
    # Room for 4.5 blocks.
    return module_daemon(host_capacity=str(4 * BLOCK + BLOCK // 2))


@pytest.fixture
def ns(d):
    info = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T)
    yield kvs.Ns(info)
    try:
        d.admin.DropNamespace(pb.NameRequest(name=info.spec.name), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_replace_while_reading(d, ns):
    old, new = ns.payload(T, seed=1), ns.payload(T, seed=2)
    kvs.put(d.stub, ns.name, b"k", T, old)
    g = SlowGet(d, ns.name, b"k")
    assert kvs.put(d.stub, ns.name, b"k", T, new).replaced
    assert kvs.get(d.stub, ns.name, b"k").data == new
    assert g.finish() == old  # the reader sees the old block whole, never a mix


def test_delete_while_reading(d, ns):
    data = ns.payload(T, seed=3)
    kvs.put(d.stub, ns.name, b"k", T, data)
    g = SlowGet(d, ns.name, b"k")
    assert d.stub.Delete(pb.KeysRequest(namespace=ns.name, keys=[b"k"])).deleted == 1
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, b"k", words="key")
    assert g.finish() == data
    # The reader's reference is gone: the bytes are returned to the tier.
    deadline = time.monotonic() + 5
    while d.host_tier().used_bytes != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.host_tier().used_bytes == 0


def test_drop_namespace_while_reading(d, ns):
    data = ns.payload(T, seed=4)
    kvs.put(d.stub, ns.name, b"k", T, data)
    g = SlowGet(d, ns.name, b"k")
    assert d.admin.DropNamespace(pb.NameRequest(name=ns.name)).blocks_dropped == 1
    assert g.finish() == data
    deadline = time.monotonic() + 5
    while d.host_tier().used_bytes != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.host_tier().used_bytes == 0


def test_cancelled_get_releases_block(d, ns):
    """A client that walks away from a Get mid-stream does not pin the block."""
    data = ns.payload(T, seed=5)
    kvs.put(d.stub, ns.name, b"k", T, data)
    g = SlowGet(d, ns.name, b"k")
    g.it.cancel()
    g.ch.close()
    assert d.stub.Delete(pb.KeysRequest(namespace=ns.name, keys=[b"k"])).deleted == 1
    deadline = time.monotonic() + 5
    while d.host_tier().used_bytes != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.host_tier().used_bytes == 0
    # The daemon still serves.
    kvs.put(d.stub, ns.name, b"k2", T, data)
    assert kvs.get(d.stub, ns.name, b"k2").data == data


def test_eviction_skips_busy_blocks(d, ns):
    """With all 4 stored blocks being read, a 5th Put cannot make room:
    RESOURCE_EXHAUSTED; once the readers finish it succeeds and evicts the LRU one."""
    datas = [ns.payload(T, seed=10 + i) for i in range(5)]
    keys = [f"b{i}".encode() for i in range(5)]
    for k, p in zip(keys, datas):
        if k != keys[4]:
            kvs.put(d.stub, ns.name, k, T, p)
    readers = [SlowGet(d, ns.name, k) for k in keys[:4]]
    kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.put, d.stub, ns.name, keys[4], T,
                     datas[4])
    for i, g in enumerate(readers):
        assert g.finish() == datas[i]
    # Reader references are released when the calls end (asynchronously on the server).
    deadline = time.monotonic() + 5
    while True:
        try:
            kvs.put(d.stub, ns.name, keys[4], T, datas[4])
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert time.monotonic() < deadline, "Put still refused after the readers ended"
            time.sleep(0.1)
    present = list(d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=keys)).present)
    assert present == [False, True, True, True, True]
    for i in range(1, 5):
        assert kvs.get(d.stub, ns.name, keys[i]).data == datas[i]


def test_busy_block_survives_eviction(d, ns):
    """The LRU block is being read: eviction takes the next one instead."""
    datas = [ns.payload(T, seed=20 + i) for i in range(5)]
    keys = [f"c{i}".encode() for i in range(5)]
    for k, p in zip(keys[:4], datas[:4]):
        kvs.put(d.stub, ns.name, k, T, p)
    g = SlowGet(d, ns.name, keys[0])  # c0 becomes MRU *and* busy
    # Touch c1..c3 so c0 is the least recently used again.
    for k, p in zip(keys[1:4], datas[1:4]):
        assert kvs.get(d.stub, ns.name, k).data == p
    kvs.put(d.stub, ns.name, keys[4], T, datas[4])
    present = list(d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=keys)).present)
    assert present == [True, False, True, True, True], present
    assert g.finish() == datas[0]


def test_concurrent_puts_never_overshoot(d, ns):
    """Eight Puts of 8 MiB at once into a 36 MiB tier: some may be refused
    (RESOURCE_EXHAUSTED while others hold reservations), none corrupt, and the tier
    never reports more than its capacity."""
    results = {}

    def one(i):
        p = ns.payload(T, seed=100 + i)
        ch, stub, _ = d.stubs()
        with ch:
            try:
                kvs.put(stub, ns.name, f"p{i}".encode(), T, p, chunk=1 << 20)
                results[i] = "ok"
            except grpc.RpcError as e:
                results[i] = e.code()

    ths = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert set(results) == set(range(8))
    assert all(r in ("ok", grpc.StatusCode.RESOURCE_EXHAUSTED) for r in results.values()), results
    host = d.host_tier()
    assert host.used_bytes <= host.capacity_bytes
    alive = 0
    for i in range(8):
        try:
            assert kvs.get(d.stub, ns.name, f"p{i}".encode()).data == ns.payload(T, seed=100 + i)
            alive += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
    assert 1 <= alive <= 4
