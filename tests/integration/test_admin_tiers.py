"""KvAdmin Verify, Flush and Evict (issue 5 items 3 and 4, DESIGN §4 and §10), through kvctl
and the Python stubs, on a daemon with a disk tier in a temporary --data-dir:
  - verify finds a record corrupted on disk (a byte flipped inside a `none` block's payload in
    data.mdb while the daemon is stopped), reports it as 1 bad, drops it (a Get then answers
    NOT_FOUND), and leaves the good blocks served byte-exact;
  - flush writes host blocks to disk: after it and a SIGKILL (no flush at exit) a restart
    serves them, while a block put after the flush is gone;
  - evict --to disk moves the selected blocks (Lookup shows DISK; they still read back), evict
    --to none removes them (gone after a restart too), --all empties every namespace;
  - bad requests and tokens are refused with the field named."""
import json
import os

import grpc

import kvs
from kvs import TIER_HOST, TIER_NONE, pb

TIER_DISK = pb.TIER_DISK
L, H, D, T = 2, 2, 64, 16  # 16 KiB `none` blocks: each value its own overflow pages
Target = pb.EvictRequest.Target


def data_args(tmp_path, *more):
    return ["--data-dir", str(tmp_path / "data"), "--stats-interval", "0", *more]


def kvctl_json(d, *args, ok=True):
    r = d.kvctl("--json", *args)
    out = r.stdout.decode()
    if ok:
        assert r.returncode == 0, (args, r.returncode, out, r.stderr.decode())
    return r, (json.loads(out) if out.strip() else None)


def lookup(d, ns, keys):
    return list(d.stub.Lookup(pb.KeysRequest(namespace=ns, keys=keys), timeout=10).tiers)


def tier_row(js, name):
    return [t for t in js["tiers"] if t["tier"] == name][0]


def to_host(d, ns):
    """Where the daemon has a GPU tier (a GPU machine), moves ns's blocks to the host tier,
    so that the test sees host blocks either way."""
    if d.has_gpu_tier():
        rep = d.admin.Evict(pb.EvictRequest(namespace=ns.name, to=Target.TARGET_HOST),
                            timeout=60)
        assert rep.busy == 0 and rep.failed == 0, rep


def test_verify_finds_corrupt_disk_record(daemon, tmp_path):
    extra = data_args(tmp_path)
    d = daemon(extra=extra)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    datas = {b"bad": ns.payload(T, seed=7), b"good": ns.payload(T, seed=8)}
    for k, v in datas.items():
        kvs.put(d.stub, ns.name, k, T, v)
    to_host(d, ns)
    # Nothing is bad yet: every host block checked, nothing on disk.
    _, js = kvctl_json(d, "verify")
    assert tier_row(js, "host") == {"tier": "host", "checked": 2, "bad": 0, "skipped": 0}
    assert tier_row(js, "disk")["checked"] == 0 and js["bad"] == 0
    _, fl = kvctl_json(d, "flush")
    assert fl["written"] == 2 and fl["failed"] == 0
    d.stop()

    # The payload of a `none` block is stored verbatim: find 64 bytes from the middle of
    # "bad"'s payload in data.mdb (each block was written once) and flip one bit there.
    path = tmp_path / "data" / "data.mdb"
    mdb = bytearray(path.read_bytes())
    pattern = datas[b"bad"][4096:4160]
    at = mdb.find(pattern)
    assert at >= 0, "the payload is not in data.mdb"
    assert mdb.find(pattern, at + 1) < 0, "the payload is in data.mdb twice"
    mdb[at + 17] ^= 0x04
    path.write_bytes(bytes(mdb))

    d2 = daemon(extra=extra)  # the start scans headers only: the block is indexed
    assert lookup(d2, ns.name, [b"bad", b"good"]) == [TIER_DISK, TIER_DISK]
    r, js = kvctl_json(d2, "verify", ok=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "1 bad" in r.stderr.decode()
    assert tier_row(js, "disk") == {"tier": "disk", "checked": 2, "bad": 1, "skipped": 0}
    assert tier_row(js, "host")["checked"] == 0
    # Dropped, index entry included: a miss now, never the wrong bytes.
    assert lookup(d2, ns.name, [b"bad", b"good"]) == [TIER_NONE, TIER_DISK]
    e = kvs.rpc_error(kvs.get, d2.stub, ns.name, b"bad")
    assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS), e
    assert kvs.get(d2.stub, ns.name, b"good").data == datas[b"good"]
    disk = [t for t in d2.stats().tiers if t.tier == TIER_DISK][0]
    assert disk.blocks == 0  # "good" was promoted by the Get; "bad" is gone
    # A second pass finds nothing more (the text form, too).
    r = d2.kvctl("verify")
    assert r.returncode == 0, r.stderr
    assert "0 bad" in r.stdout.decode()
    assert "records were bad and were dropped" in d2.stderr_text()


def test_flush_then_kill_keeps_host_blocks(daemon, tmp_path):
    extra = data_args(tmp_path, "--flush-on-exit", "off")
    d = daemon(extra=extra)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    keys = [b"f%d" % i for i in range(6)]
    datas = {k: ns.payload(T, seed=100 + i) for i, k in enumerate(keys)}
    for k in keys:
        kvs.put(d.stub, ns.name, k, T, datas[k])
    to_host(d, ns)
    r = d.kvctl("flush")
    assert r.returncode == 0, r.stderr
    assert "6 host blocks written" in r.stdout.decode()
    _, fl = kvctl_json(d, "flush")  # nothing left to write
    assert fl == {"written": 0, "failed": 0, "already": 6, "gpu_skipped": 0}
    assert lookup(d, ns.name, keys) == [TIER_HOST] * 6  # flushed blocks stay in RAM
    kvs.put(d.stub, ns.name, b"late", T, ns.payload(T, seed=99))  # after the flush
    d.kill()  # SIGKILL: no flush at exit

    d2 = daemon(extra=extra)
    assert lookup(d2, ns.name, keys + [b"late"]) == [TIER_DISK] * 6 + [TIER_NONE]
    for k in keys:
        assert kvs.get(d2.stub, ns.name, k).data == datas[k], k


def test_evict_to_disk_and_out(daemon, tmp_path):
    extra = data_args(tmp_path)
    d = daemon(extra=extra)
    a = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    b = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    keys = [b"e%d" % i for i in range(5)]
    datas = {}
    for ns in (a, b):
        for i, k in enumerate(keys):
            datas[ns.name, k] = ns.payload(T, seed=kvs.seed_of(ns.name, i))
            kvs.put(d.stub, ns.name, k, T, datas[ns.name, k])
        to_host(d, ns)

    # Two keys of a (and one that does not exist) to disk.
    _, js = kvctl_json(d, "evict", "--ns", a.name, "--to", "disk", "e0", "e1", "nope")
    assert js == {"to": "disk", "moved": 2, "dropped": 0, "unchanged": 0, "busy": 0,
                  "failed": 0, "absent": 1}
    assert lookup(d, a.name, keys) == [TIER_DISK] * 2 + [TIER_HOST] * 3
    assert lookup(d, b.name, keys) == [TIER_HOST] * 5
    # Again: already there.
    _, js = kvctl_json(d, "evict", "--ns", a.name, "e0", "e1")  # --to disk is the default
    assert (js["moved"], js["unchanged"]) == (0, 2)
    # Every block of a: the other three move, the two on disk stay.
    _, js = kvctl_json(d, "evict", "--ns", a.name, "--to", "disk")
    assert (js["moved"], js["unchanged"], js["busy"]) == (3, 2, 0)
    assert lookup(d, a.name, keys) == [TIER_DISK] * 5
    # --to host does not move disk blocks up.
    _, js = kvctl_json(d, "evict", "--ns", a.name, "--to", "host")
    assert (js["moved"], js["unchanged"]) == (0, 5)
    # They read back exactly (and move back to the host tier: --promote on).
    assert kvs.get(d.stub, a.name, b"e3").data == datas[a.name, b"e3"]
    # (and on to the GPU tier, where the daemon has one)
    assert lookup(d, a.name, [b"e3"]) in ([TIER_HOST], [pb.TIER_GPU])
    # Stats count the evictions; the disk tier holds what moved.
    disk = [t for t in d.stats().tiers if t.tier == TIER_DISK][0]
    assert disk.blocks == 4

    # Out: one key of a, from the disk tier (its record goes too) ...
    r = d.kvctl("evict", "--ns", a.name, "--to", "none", "e0")
    assert r.returncode == 0, r.stderr
    assert "1 dropped" in r.stdout.decode()
    assert lookup(d, a.name, [b"e0"]) == [TIER_NONE]
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, a.name, b"e0", words="key")
    # ... and a host block of b through the stub.
    rep = d.admin.Evict(pb.EvictRequest(namespace=b.name, keys=[b"e4"], to=Target.TARGET_OUT),
                        timeout=30)
    assert (rep.dropped, rep.absent) == (1, 0)
    d.stop()

    # A restart (host blocks flushed at exit) finds what was not evicted out, nothing else.
    d2 = daemon(extra=extra)
    assert lookup(d2, a.name, keys) == [TIER_NONE] + [TIER_DISK] * 4
    assert lookup(d2, b.name, keys) == [TIER_DISK] * 4 + [TIER_NONE]
    for ns in (a, b):
        for k in keys[1:4]:
            assert kvs.get(d2.stub, ns.name, k).data == datas[ns.name, k], (ns.name, k)
    # --all --to none empties every namespace (the namespaces stay).
    _, js = kvctl_json(d2, "evict", "--all", "--to", "none")
    assert js["dropped"] == 8, js
    assert lookup(d2, a.name, keys) == [TIER_NONE] * 5
    assert lookup(d2, b.name, keys) == [TIER_NONE] * 5
    assert {n.spec.name: n.blocks for n in d2.stats().namespaces} == {a.name: 0, b.name: 0}
    d2.stop()
    d3 = daemon(extra=extra)
    assert lookup(d3, a.name, keys) == [TIER_NONE] * 5
    assert lookup(d3, b.name, keys) == [TIER_NONE] * 5


def test_host_watermarks_demote_in_background(daemon, tmp_path):
    """Past --host-watermarks' high mark the host tier writes its oldest idle blocks to disk
    by itself (no Put needs the room), down to the low mark; every block still reads back."""
    import time
    cap = 1 << 20
    d = daemon(extra=data_args(tmp_path, "--host-capacity", str(cap), "--gpu-capacity", "0",
                               "--host-watermarks", "40,20"))
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    datas = {}
    for i in range(20):  # 20 blocks of 16 KiB: under 40% of 1 MiB, nothing moves
        datas[b"w%d" % i] = ns.payload(T, seed=kvs.seed_of(ns.name, i))
        kvs.put(d.stub, ns.name, b"w%d" % i, T, datas[b"w%d" % i])
    time.sleep(0.3)
    assert lookup(d, ns.name, list(datas)) == [TIER_HOST] * 20
    # Blocks take 16,468 bytes encoded and 512 of bookkeeping: the 25th crosses 40% (24 are
    # 407,520 bytes, under 419,430), and the tier then goes down to 20% and stays (no later
    # Put to raise it).
    one = 16468 + kvs.BLOCK_META
    for i in range(20, 25):
        datas[b"w%d" % i] = ns.payload(T, seed=kvs.seed_of(ns.name, i))
        kvs.put(d.stub, ns.name, b"w%d" % i, T, datas[b"w%d" % i])
    # Done when the host tier is under the low mark and the writer has committed what it
    # took (until then Lookup still reports HOST for a block on its way).
    deadline = time.time() + 20
    while time.time() < deadline:
        tiers = lookup(d, ns.name, list(datas))
        if d.host_tier().used_bytes <= cap * 20 // 100 and \
                tiers.count(TIER_HOST) * one <= cap * 20 // 100:
            break
        time.sleep(0.05)
    host = d.host_tier()
    assert host.used_bytes <= cap * 20 // 100, host
    n_disk = tiers.count(TIER_DISK)
    assert n_disk + tiers.count(TIER_HOST) == 25
    # Oldest first (LRU): the disk blocks are a prefix of the put order.
    assert tiers == [TIER_DISK] * n_disk + [TIER_HOST] * (25 - n_disk), tiers
    assert n_disk >= 13
    for k, want in datas.items():
        assert kvs.get(d.stub, ns.name, k).data == want, k


def test_bad_requests_and_tokens(daemon, tmp_path):
    d = daemon()  # no disk tier
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    kvs.put(d.stub, ns.name, b"x", T, ns.payload(T, seed=1))
    to_host(d, ns)
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    kvs.expect_error(INVALID, d.admin.Flush, pb.FlushRequest(), words=["disk tier", "--data-dir"])
    kvs.expect_error(INVALID, d.admin.Evict, pb.EvictRequest(namespace=ns.name), words="to")
    kvs.expect_error(INVALID, d.admin.Evict,
                     pb.EvictRequest(namespace=ns.name, to=Target.TARGET_DISK),
                     words=["to", "disk tier"])
    kvs.expect_error(INVALID, d.admin.Evict, pb.EvictRequest(to=Target.TARGET_OUT),
                     words="namespace")
    kvs.expect_error(INVALID, d.admin.Evict, pb.EvictRequest(keys=[b"x"], to=Target.TARGET_OUT),
                     words="keys")
    kvs.expect_error(INVALID, d.admin.Evict,
                     pb.EvictRequest(namespace=ns.name, all=True, to=Target.TARGET_OUT),
                     words="all")
    kvs.expect_error(INVALID, d.admin.Evict,
                     pb.EvictRequest(namespace=ns.name, keys=[b""], to=Target.TARGET_OUT),
                     words="keys[0]")
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.admin.Evict,
                     pb.EvictRequest(namespace="nope", to=Target.TARGET_OUT), words="namespace")
    # Without a disk tier: verify checks the host tier only; evict to host is a no-op.
    rep = d.admin.Verify(pb.VerifyRequest(), timeout=30)
    assert [(t.tier, t.checked, t.bad) for t in rep.tiers if t.tier != pb.TIER_GPU] == \
        [(TIER_HOST, 1, 0)]
    rep = d.admin.Evict(pb.EvictRequest(namespace=ns.name, to=Target.TARGET_HOST), timeout=30)
    assert rep.unchanged + rep.moved == 1
    # kvctl's own usage errors (exit 2) before any call.
    for args in (["evict"], ["evict", "k"], ["evict", "--all", "--ns", ns.name],
                 ["evict", "--ns", ns.name, "--to", "gpu"], ["verify", "extra"]):
        r = d.kvctl(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
    r = d.kvctl("flush")
    assert r.returncode == 1 and b"--data-dir" in r.stderr, r.stderr

    # Admin token rules, as for every KvAdmin call.
    d2 = daemon(extra=["--token", "c", "--admin-token", "adm"], token="adm")
    for call, req in ((d2.admin.Verify, pb.VerifyRequest()), (d2.admin.Flush, pb.FlushRequest()),
                      (d2.admin.Evict, pb.EvictRequest(all=True, to=Target.TARGET_OUT))):
        kvs.expect_error(grpc.StatusCode.UNAUTHENTICATED, call, req)
        kvs.expect_error(grpc.StatusCode.PERMISSION_DENIED, call, req, metadata=kvs.bearer("c"))
    rep = d2.admin.Evict(pb.EvictRequest(all=True, to=Target.TARGET_OUT),
                         metadata=kvs.bearer("adm"), timeout=30)
    assert rep.dropped == 0
    r = d2.kvctl("--token", "adm", "verify")
    assert r.returncode == 0, r.stderr


def test_evict_gpu_blocks(daemon, tmp_path):
    """Where the daemon has a GPU tier (a GPU machine): evict moves GPU blocks to the host
    tier through the engine, and on to disk; verify counts them as skipped."""
    import pytest
    d = daemon(extra=data_args(tmp_path))
    if not d.has_gpu_tier():
        pytest.skip("no GPU tier")
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    keys = [b"g%d" % i for i in range(4)]
    datas = {k: ns.payload(T, seed=200 + i) for i, k in enumerate(keys)}
    for k in keys:
        assert kvs.put(d.stub, ns.name, k, T, datas[k]).tier == pb.TIER_GPU
    _, js = kvctl_json(d, "verify")
    assert tier_row(js, "gpu")["skipped"] == 4 and js["checked"] == 0
    _, js = kvctl_json(d, "evict", "--ns", ns.name, "--to", "host", "g0", "g1")
    assert (js["moved"], js["busy"], js["unchanged"]) == (2, 0, 0), js
    assert lookup(d, ns.name, keys) == [TIER_HOST] * 2 + [pb.TIER_GPU] * 2
    _, js = kvctl_json(d, "evict", "--ns", ns.name, "--to", "disk")
    assert (js["moved"], js["busy"], js["failed"]) == (4, 0, 0), js
    assert lookup(d, ns.name, keys) == [TIER_DISK] * 4
    for k in keys:
        assert kvs.get(d.stub, ns.name, k).data == datas[k], k


def test_stats_line_reports_tier_movements(daemon, tmp_path):
    """The periodic stats line counts spills to disk and promotions from it."""
    import time
    d = daemon(host_capacity="128K", extra=["--data-dir", str(tmp_path / "data"),
                                             "--stats-interval", "1", "--gpu-capacity", "0"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    for i in range(12):  # 16 KiB blocks: most go to disk
        kvs.put(d.stub, ns.name, b"s%d" % i, T, ns.payload(T, seed=i))
    d.admin.Flush(pb.FlushRequest(), timeout=30)
    assert kvs.get(d.stub, ns.name, b"s0").data == ns.payload(T, seed=0)  # promoted from disk
    deadline = time.time() + 5
    import re
    while time.time() < deadline:
        lines = [ln for ln in d.stderr_text().splitlines() if "stats: gpu" in ln]
        m = re.search(r"spills (\d+),.* disk .* promotions (\d+)", lines[-1]) if lines else None
        if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
            break
        time.sleep(0.2)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, lines[-1:] if lines else "no line"
