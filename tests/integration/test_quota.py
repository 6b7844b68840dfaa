"""Per-namespace quotas (issue 14 item 3): the outside test's finding was that a client
writing into one namespace evicts every other namespace's blocks once the host tier is full.
A namespace with host_quota_bytes makes room among its own blocks when a Put would take it
over its quota, so tenants within their quotas never lose blocks to it; disk_quota_bytes
does the same in the disk tier (its spills evict its own oldest records, a durable Put that
cannot is RESOURCE_EXHAUSTED naming the field, and the charge is exact across a restart);
gpu_quota_bytes likewise in the GPU tier (storage unit tests: no GPU here). Each quota is
checked at creation (at least one full block), shown back by every admin call, survives a
restart of a durable store, and is set the same way from kvctl and the Python package."""
import json
import re
import socket
import urllib.request

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


QUOTAS = ("host_quota_bytes", "gpu_quota_bytes", "disk_quota_bytes")


def quotas(spec):
    return tuple(getattr(spec, q) for q in QUOTAS)


def test_quota_is_checked_and_shown(daemon):
    d = daemon(extra=["--stats-interval", 0])
    for q in QUOTAS:
        kvs.expect_error(grpc.StatusCode.INVALID_ARGUMENT, kvs.make_ns, d.admin, L=L, H=H, D=D,
                         T=T, **{q: MIB - 1}, words=(q, "one full block"))
    name = kvs.ns_name("q")
    r = d.kvctl("--json", "ns", "create", name, "--layers", L, "--kv-heads", H, "--head-dim", D,
                "--block-tokens", T, "--host-quota", "5M", "--gpu-quota", "6M",
                "--disk-quota", "7M")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert tuple(shown[q] for q in QUOTAS) == (5 * MIB, 6 * MIB, 7 * MIB)
    listed = {n.spec.name: quotas(n.spec) for n in d.stats().namespaces}
    assert listed[name] == (5 * MIB, 6 * MIB, 7 * MIB)
    for flag in ("--host-quota", "--gpu-quota", "--disk-quota"):
        r = d.kvctl("ns", "create", "bad", "--layers", 1, "--kv-heads", 1, "--head-dim", 16,
                    "--block-tokens", 1, flag, "lots")
        assert r.returncode != 0 and flag.encode() in r.stderr

    kvstash = kvs.client_package()
    with kvstash.Client(d.target) as c:
        ns = c.create_namespace(kvs.ns_name("qp"), layers=L, kv_heads=H, head_dim=D,
                                block_tokens=T, host_quota_bytes=3 * MIB,
                                gpu_quota_bytes=2 * MIB, disk_quota_bytes=4 * MIB)
        got = c.namespace(ns.name)
        for n in (ns, got):
            assert (n.host_quota_bytes, n.gpu_quota_bytes, n.disk_quota_bytes) == \
                (3 * MIB, 2 * MIB, 4 * MIB)


def test_quota_survives_a_restart(daemon, tmp_path):
    extra = ["--data-dir", str(tmp_path / "data"), "--stats-interval", "0"]
    d = daemon(extra=extra)
    name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, host_quota_bytes=7 * MIB).spec.name
    both = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, gpu_quota_bytes=2 * MIB,
                       disk_quota_bytes=9 * MIB).spec.name
    d.stop()
    d2 = daemon(extra=extra)
    got = {n.spec.name: quotas(n.spec) for n in d2.stats().namespaces}
    assert got == {name: (7 * MIB, 0, 0), both: (0, 2 * MIB, 9 * MIB)}


# ---------------------------------------------------------------- the disk tier


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ns_gauges(port, family):
    """{namespace: value} of one per-namespace gauge of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    pat = re.compile(r'^%s\{namespace="([^"]*)"\} (\S+)$' % re.escape(family), re.M)
    return {m.group(1): int(float(m.group(2))) for m in pat.finditer(text)}


def disk_daemon(daemon, tmp_path, disk="24M"):
    """A daemon with a 4 MiB host tier over a disk tier, /metrics on a free port; the spill
    queue holds every victim (a full one drops them, which is not what is tested here)."""
    port = free_port()
    extra = ["--data-dir", str(tmp_path / "data"), "--disk-capacity", disk, "--spill-queue",
             "64M", "--stats-interval", 0, "--gpu-capacity", 0, "--metrics-listen",
             f"127.0.0.1:{port}"]
    return daemon(host_capacity="4M", extra=extra), port, extra


def test_a_namespace_over_its_disk_quota_evicts_only_its_own_records(daemon, tmp_path):
    """Disk tier of 24 MiB under a 4 MiB host tier: B stores 10 blocks, which spill to disk;
    A (disk quota 8 MiB) then stores 40. A's spills evict A's own oldest records, so every
    one of B's blocks stays readable and A holds at most its quota on disk; the charge of
    each namespace is the same after a restart. Without the quota, the same load takes B's
    records (the control)."""
    d, port, extra = disk_daemon(daemon, tmp_path)
    a = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, disk_quota_bytes=8 * MIB))
    b = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    assert a.info.spec.disk_quota_bytes == 8 * MIB
    want = {k: b.payload(seed=i) for i, k in enumerate(keys(b"b", 10))}
    for k, v in want.items():
        kvs.put(d.stub, b.name, k, T, v)
    data = a.payload(seed=99)
    ka = keys(b"a", 40)
    for k in ka:
        kvs.put(d.stub, a.name, k, T, data)
    # Flush writes the host blocks too and waits for the disk writer: every block of both
    # namespaces has its record now, A's within its quota.
    d.admin.Flush(pb.FlushRequest(), timeout=60)
    for k, v in want.items():
        assert kvs.get(d.stub, b.name, k).data == v
    info = {n.spec.name: n for n in d.stats().namespaces}
    per_block = info[a.name].stored_bytes // info[a.name].blocks
    held = (8 * MIB) // per_block  # 7: 8 blocks are a little over 8 MiB
    disk = ns_gauges(port, "kvstash_namespace_disk_bytes")
    assert disk[b.name] == info[b.name].stored_bytes == 10 * per_block
    assert disk[a.name] == info[a.name].stored_bytes == held * per_block
    assert present(d, a.name, ka) == held and present(d, a.name, ka[-held:]) == held
    assert kvs.get(d.stub, a.name, ka[-1]).data == data
    tier = [t for t in d.stats().tiers if t.tier == pb.TIER_DISK][0]
    assert tier.used_bytes == (10 + held) * per_block

    # A restart charges each namespace exactly its records again.
    d.stop()
    d, port, _ = disk_daemon(daemon, tmp_path)
    assert ns_gauges(port, "kvstash_namespace_disk_bytes") == disk
    assert present(d, b.name, list(want)) == 10

    # The control: the same load into a namespace without a quota takes B's records.
    c = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    for k in keys(b"c", 24):
        kvs.put(d.stub, c.name, k, T, data)
    d.admin.Flush(pb.FlushRequest(), timeout=60)
    assert present(d, b.name, list(want)) < 10


def test_durable_put_over_its_disk_quota_is_refused(daemon, tmp_path):
    """A durable namespace's records are never evicted: once its disk quota is full, a Put is
    RESOURCE_EXHAUSTED naming disk_quota_bytes and nothing of it is stored, while another
    namespace stores on; the same holds after a restart (the charge is recomputed from the
    records), and a Delete makes room again."""
    d, port, extra = disk_daemon(daemon, tmp_path)
    a = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, durable=True,
                           disk_quota_bytes=3 * MIB))
    b = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    data = a.payload(seed=5)
    for k in keys(b"a", 2):  # two blocks of a little over 1 MiB
        kvs.put(d.stub, a.name, k, T, data)
    kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.put, d.stub, a.name, b"a-002", T,
                     data, words=("disk_quota_bytes", a.name))
    assert present(d, a.name, keys(b"a", 3)) == 2
    for k in keys(b"b", 6):
        kvs.put(d.stub, b.name, k, T, data)
    charged = ns_gauges(port, "kvstash_namespace_disk_bytes")[a.name]
    assert 2 * MIB < charged <= 3 * MIB

    d.stop()
    d, port, _ = disk_daemon(daemon, tmp_path)
    assert ns_gauges(port, "kvstash_namespace_disk_bytes")[a.name] == charged
    kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.put, d.stub, a.name, b"a-002", T,
                     data, words=("disk_quota_bytes",))
    assert d.stub.Delete(pb.KeysRequest(namespace=a.name, keys=[b"a-000"]),
                         timeout=10).deleted == 1
    kvs.put(d.stub, a.name, b"a-002", T, data)
    assert present(d, a.name, keys(b"a", 3)) == 2
