"""Durable namespaces (DESIGN §7): a Put is answered only once its block is committed to
LMDB and flushed, so a SIGKILL right after the answer loses nothing; a daemon without a
disk tier refuses such a namespace; a durable write that cannot be done (disk tier full
of blocks it may not evict) answers RESOURCE_EXHAUSTED and leaves nothing behind."""
import grpc

import kvs
from kvs import pb

L, H, D, T = 2, 2, 64, 16


def test_durable_needs_data_dir(daemon):
    d = daemon()
    kvs.expect_error(grpc.StatusCode.INVALID_ARGUMENT, kvs.make_ns, d.admin, durable=True,
                     words=("durable", "--data-dir"))
    assert not [n for n in d.stats().namespaces if n.spec.durable]


def test_durable_put_survives_sigkill(daemon, tmp_path):
    extra = ["--data-dir", str(tmp_path / "data"), "--stats-interval", "0"]
    d = daemon(extra=extra)
    info = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, durable=True)
    assert info.spec.durable
    ns = kvs.Ns(info)
    plain = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    want = {}
    for i in range(20):
        key = f"d{i}".encode()
        want[key] = ns.payload(T if i % 3 else 5, seed=i)
        r = kvs.put(d.stub, ns.name, key, len(want[key]) // ns.bytes(1), want[key])
        assert r.tier == kvs.TIER_HOST  # written from the host tier, kept there too
    # Replacing a durable block: the new bytes are the ones that survive.
    want[b"d0"] = ns.payload(T, seed=100)
    assert kvs.put(d.stub, ns.name, b"d0", T, want[b"d0"]).replaced
    kvs.put(d.stub, plain.name, b"p0", T, plain.payload(T, seed=7))  # host only: no durability
    for k, v in want.items():
        assert kvs.get(d.stub, ns.name, k).data == v
    d.kill()  # SIGKILL: no drain, no flush

    d2 = daemon(extra=extra)
    spaces = {n.spec.name: n for n in d2.stats().namespaces}
    assert spaces[ns.name].spec.durable
    for k, v in want.items():
        assert kvs.get(d2.stub, ns.name, k).data == v, k
    # The plain namespace's spec was recorded at create; its block never reached disk.
    assert plain.name in spaces
    lk = d2.stub.Lookup(pb.KeysRequest(namespace=plain.name, keys=[b"p0"]), timeout=10)
    assert lk.prefix_blocks == 0
    # A Delete in a durable namespace is answered once the deletions are on disk: the
    # deleted blocks stay deleted through a SIGKILL right after the answer.
    gone = [b"d1", b"d2", b"d3"]
    assert d2.stub.Delete(pb.KeysRequest(namespace=ns.name, keys=gone + [b"nope"]),
                          timeout=10).deleted == 3
    d2.kill()
    d3 = daemon(extra=extra)
    lk = d3.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=list(want)), timeout=10)
    assert [t != kvs.TIER_NONE for t in lk.tiers] == [k not in gone for k in want]
    d3.stop()


def test_durable_disk_full(daemon, tmp_path):
    """Durable blocks are never evicted from the disk tier, so once its budget is full of
    them the Put that does not fit fails (RESOURCE_EXHAUSTED naming the disk tier) and its
    key is absent; every block acknowledged before it is served."""
    extra = ["--data-dir", str(tmp_path / "data"), "--disk-capacity", "64M",
             "--stats-interval", "0"]
    d = daemon(host_capacity="512M", extra=extra)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=8, H=8, D=128, T=64, durable=True))  # 2 MiB blocks
    data = ns.payload(ns.T, seed=1)
    acked = []
    err = None
    for i in range(64):  # 128 MiB: about twice the map
        key = f"f{i}".encode()
        try:
            kvs.put(d.stub, ns.name, key, ns.T, data)
        except grpc.RpcError as e:
            err = (key, e)
            break
        acked.append(key)
    assert err, "the disk tier never filled"
    key, e = err
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert "durable" in e.details() and "not stored" in e.details(), e.details()
    assert "disk tier" in e.details(), e.details()
    print(f"{len(acked)} durable blocks acknowledged before: {e.details()}")
    assert len(acked) >= 20
    lk = d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=[key]), timeout=10)
    assert lk.tiers[0] == kvs.TIER_NONE
    for k in (acked[0], acked[-1]):
        assert kvs.get(d.stub, ns.name, k).data == data
    assert d.health().status == kvs.SERVING
    d.stop()
