"""16 concurrent clients (threads, each its own channel) x 200 mixed operations over a
shared keyspace. Each thread owns a key range for writes and deletes, so it knows the
exact state of its own keys; it reads any key, and a block read from another thread's key
must be one of the versions ever written to it (or NOT_FOUND). Payloads are
deterministic from (key, version), so bytes are checked without races."""
import hashlib
import random
import threading

import grpc

import kvs
from kvs import TIER_HOST, TIER_NONE, pb

THREADS, OPS, KEYS_PER_THREAD = 16, 200, 6
L, H, D, T = 2, 2, 16, 8


def digest(b):
    return hashlib.blake2b(b, digest_size=16).digest()


class Shared:
    def __init__(self):
        self.lock = threading.Lock()
        self.versions = {}  # key -> set of digests ever written (registered before the Put)


def key_of(owner, i):
    return f"t{owner:02d}-k{i}".encode()


def block_for(ns, key, version):
    seed = kvs.seed_of(key, version)
    t = 1 + seed % T
    return t, ns.payload(t, seed=seed)


def worker(d, ns, shared, tid, errors, evicting=False):
    """With evicting=True the tier is too small for the keyspace: an own key may vanish
    (evicted) at any time, but whenever it is served it must hold exactly its last
    version."""
    rng = random.Random(tid)
    ch, stub, _ = d.stubs()
    mine = {key_of(tid, i): None for i in range(KEYS_PER_THREAD)}  # key -> bytes or None
    version = {k: 0 for k in mine}
    all_keys = [key_of(o, i) for o in range(THREADS) for i in range(KEYS_PER_THREAD)]
    try:
        with ch:
            for op_i in range(OPS):
                op = rng.choice(["put", "put", "get", "get", "get", "lookup", "exists",
                                 "delete"])
                if op == "put":
                    k = rng.choice(list(mine))
                    version[k] += 1
                    t, p = block_for(ns, k, version[k])
                    with shared.lock:
                        shared.versions.setdefault(k, set()).add(digest(p))
                    try:
                        r = kvs.put(stub, ns.name, k, t, p,
                                    chunk=rng.choice([1 << 20, 1000, 333]))
                    except grpc.RpcError as e:
                        # A tiny tier whose every block is busy may refuse a Put; the key
                        # then holds its old version or nothing.
                        if not (evicting and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED):
                            raise
                        continue
                    assert evicting or r.replaced == (mine[k] is not None), (k, r)
                    assert r.raw_bytes == len(p)
                    mine[k] = p
                elif op == "get":
                    k = rng.choice(all_keys)
                    try:
                        g = kvs.get(stub, ns.name, k)
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND, (k, e.code(), e.details())
                        if k in mine and not evicting:
                            assert mine[k] is None, f"own key {k} missing"
                        continue
                    assert g.header.total_bytes == len(g.data)
                    assert g.header.total_bytes == ns.bytes(g.header.tokens)
                    if k in mine:
                        assert mine[k] is not None, f"own key {k}: served after its delete"
                        assert g.data == mine[k], f"own key {k}: wrong bytes"
                    else:
                        with shared.lock:
                            ok = digest(g.data) in shared.versions.get(k, ())
                        assert ok, f"key {k}: bytes of no version ever written"
                elif op in ("lookup", "exists"):
                    ks = rng.sample(all_keys, rng.randint(1, 12))
                    req = pb.KeysRequest(namespace=ns.name, keys=ks)
                    if op == "lookup":
                        r = stub.Lookup(req, timeout=10)
                        assert len(r.tiers) == len(ks)
                        got = [t != TIER_NONE for t in r.tiers]
                        assert all(t in (TIER_NONE, TIER_HOST) for t in r.tiers)
                        lead = next((i for i, p in enumerate(got) if not p), len(got))
                        assert r.prefix_blocks == lead, (r.prefix_blocks, got)
                    else:
                        got = list(stub.Exists(req, timeout=10).present)
                        assert len(got) == len(ks)
                    for k, p in zip(ks, got):
                        if k in mine and (p or not evicting):
                            assert p == (mine[k] is not None), f"own key {k}: present={p}"
                else:  # delete some of my keys
                    ks = rng.sample(list(mine), rng.randint(1, 3))
                    r = stub.Delete(pb.KeysRequest(namespace=ns.name, keys=ks), timeout=10)
                    n_live = sum(mine[k] is not None for k in ks)
                    assert r.deleted <= n_live if evicting else r.deleted == n_live, \
                        (ks, r.deleted)
                    for k in ks:
                        mine[k] = None
            # Final check of every own key.
            for k, p in mine.items():
                if p is None:
                    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, stub, ns.name, k)
                elif evicting:
                    try:
                        assert kvs.get(stub, ns.name, k).data == p
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
                else:
                    assert kvs.get(stub, ns.name, k).data == p
    except BaseException as e:  # report from the main thread
        errors.append(f"thread {tid}: {type(e).__name__}: {e}")
    return mine


def run_workers(d, ns, evicting):
    shared, errors, results = Shared(), [], {}

    def run(tid):
        results[tid] = worker(d, ns, shared, tid, errors, evicting)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "workers hung"
    assert not errors, "\n".join(errors[:10])
    return results


def test_concurrent_clients(daemon):
    d = daemon(host_capacity="64M")  # everything fits: no eviction in this test
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    results = run_workers(d, ns, evicting=False)

    # The namespace counters agree with what the threads hold.
    live = [p for mine in results.values() for p in mine.values() if p is not None]
    info = [n for n in d.admin.ListNamespaces(pb.ListNamespacesRequest()).namespaces
            if n.spec.name == ns.name][0]
    assert info.blocks == len(live)
    assert info.raw_bytes == sum(len(p) for p in live)
    host = d.host_tier()
    assert host.evictions == 0
    assert host.blocks == len(live)
    assert d.health().status == kvs.SERVING


def test_concurrent_clients_with_eviction(daemon):
    """The same load in a tier that holds about a sixth of the keyspace: eviction races
    with every operation, and nothing is ever served wrong."""
    d = daemon(host_capacity=str(16 * kvs.block_bytes(L, H, D, T)))
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    run_workers(d, ns, evicting=True)
    host = d.host_tier()
    assert host.evictions > 0
    assert host.used_bytes <= host.capacity_bytes
    info = [n for n in d.admin.ListNamespaces(pb.ListNamespacesRequest()).namespaces
            if n.spec.name == ns.name][0]
    assert info.blocks == host.blocks
    # The tier charges each block its bookkeeping beside its bytes.
    assert host.block_meta_bytes == kvs.BLOCK_META
    assert info.stored_bytes + host.blocks * host.block_meta_bytes == host.used_bytes
    assert d.health().status == kvs.SERVING
