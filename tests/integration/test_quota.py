"""Per-namespace host quotas (issue 14 item 3): the outside test's finding was that a client
writing into one namespace evicts every other namespace's blocks once the host tier is full.
A namespace with host_quota_bytes makes room among its own blocks when a Put would take it
over its quota, so tenants within their quotas never lose blocks to it; the quota is checked
at creation (at least one full block), shown back by every admin call, survives a restart of
a durable store, and is set the same way from kvctl and the Python package."""
import json

import grpc

import kvs
from kvs import pb

L, H, D, T = 2, 8, 128, 128  # 1 MiB blocks
MIB = 1 << 20


def keys(prefix, n):
    return [b"%s-%03d" % (prefix, i) for i in range(n)]


def present(d, name, ks):
    r = d.stub.Exists(pb.KeysRequest(namespace=name, keys=ks), timeout=10)
    return sum(r.present)


def test_a_namespace_over_its_quota_evicts_only_its_own_blocks(daemon):
    """Host tier of 24 MiB. B stores 10 blocks; A (quota 12 MiB) then stores 40. Without the
    quota A's Puts evict B's blocks (they are the oldest); with it, A keeps its 12 newest and
    B keeps all 10."""
    # The quota is the host tier's: a GPU tier, when the machine has one, is kept out
    # (--gpu-capacity 0) so that Puts land in the host tier.
    d = daemon(host_capacity="24M", extra=["--stats-interval", 0, "--gpu-capacity", 0])
    a = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, host_quota_bytes=12 * MIB))
    b = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    assert a.bytes() == MIB
    assert a.info.spec.host_quota_bytes == 12 * MIB
    data = a.payload()
    for k in keys(b"b", 10):
        kvs.put(d.stub, b.name, k, T, data)
    for k in keys(b"a", 40):
        kvs.put(d.stub, a.name, k, T, data)
    assert present(d, b.name, keys(b"b", 10)) == 10
    ka = keys(b"a", 40)
    info = {n.spec.name: n for n in d.stats().namespaces}[a.name]
    per_block = info.stored_bytes // info.blocks  # a raw block plus its encoded header
    held = (12 * MIB) // per_block                # 11: 12 blocks are a little over 12 MiB
    assert info.blocks == held and present(d, a.name, ka) == held
    assert present(d, a.name, ka[-held:]) == held  # the newest stay (LRU within it)
    host = [t for t in d.stats().tiers if t.tier == kvs.TIER_HOST][0]
    assert host.used_bytes <= 22 * MIB and host.evictions >= 40 - held
    assert kvs.get(d.stub, a.name, ka[-1]).data == data

    # The control: the same load into a namespace without a quota takes B's blocks.
    c = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    for k in keys(b"c", 24):
        kvs.put(d.stub, c.name, k, T, data)
    assert present(d, b.name, keys(b"b", 10)) < 10


def test_quota_is_checked_and_shown(daemon):
    d = daemon(extra=["--stats-interval", 0])
    kvs.expect_error(grpc.StatusCode.INVALID_ARGUMENT, kvs.make_ns, d.admin, L=L, H=H, D=D, T=T,
                     host_quota_bytes=MIB - 1, words=("host_quota_bytes",))
    name = kvs.ns_name("q")
    r = d.kvctl("--json", "ns", "create", name, "--layers", L, "--kv-heads", H, "--head-dim", D,
                "--block-tokens", T, "--host-quota", "5M")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["host_quota_bytes"] == 5 * MIB
    listed = {n.spec.name: n.spec.host_quota_bytes for n in d.stats().namespaces}
    assert listed[name] == 5 * MIB
    r = d.kvctl("ns", "create", "bad", "--layers", 1, "--kv-heads", 1, "--head-dim", 16,
                "--block-tokens", 1, "--host-quota", "lots")
    assert r.returncode != 0 and b"--host-quota" in r.stderr

    kvstash = kvs.client_package()
    with kvstash.Client(d.target) as c:
        ns = c.create_namespace(kvs.ns_name("qp"), layers=L, kv_heads=H, head_dim=D,
                                block_tokens=T, host_quota_bytes=3 * MIB)
        assert ns.host_quota_bytes == 3 * MIB
        assert c.namespace(ns.name).host_quota_bytes == 3 * MIB


def test_quota_survives_a_restart(daemon, tmp_path):
    extra = ["--data-dir", str(tmp_path / "data"), "--stats-interval", "0"]
    d = daemon(extra=extra)
    name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, host_quota_bytes=7 * MIB).spec.name
    d.stop()
    d2 = daemon(extra=extra)
    got = {n.spec.name: n.spec.host_quota_bytes for n in d2.stats().namespaces}
    assert got == {name: 7 * MIB}
