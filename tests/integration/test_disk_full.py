"""The durable contract on a full disk (issue 10, fault 1; README "Durable namespaces").

Before: a data directory on a 64 MiB filesystem, 4 threads writing durable and
non-durable Puts until it was full: 1120 durable Puts acknowledged, 584 of them missing
after a restart (with --disk-capacity 32M: 1800 acknowledged, 251 left), and no client
ever saw an error. Disk-budget and ENOSPC eviction took durable records, and deletions
failed on the full filesystem, so the index and LMDB drifted apart.

Now: an acknowledged durable block stays until it is deleted or its namespace dropped;
non-durable records are what gets evicted; when neither the budget nor the filesystem has
room, durable Puts are refused (RESOURCE_EXHAUSTED naming the disk tier); and after a
restart the daemon knows exactly the blocks it knew before (index = LMDB).

The filesystem is a tmpfs where the test may mount one, else an ext4 image on a loop
device, else (neither possible) LMDB's map and the budget are the limit; the summary line
says which ran."""
import threading

import grpc
import pytest

import kvs
from kvs import pb

THREADS = 4
L, H, D, T = 8, 8, 64, 16  # 256 KiB blocks: a few hundred fill 64 MiB


def _report(capsys, line):
    with capsys.disabled():
        print(line, flush=True)


def _load(d, dur, plain, per_thread, acked, refused, errors, lock):
    """Each thread: its own keys, durable and non-durable Puts in turn, until it saw
    several refusals of durable Puts (the disk is full of durable blocks) or ran out."""
    def run(t):
        ch, stub, _ = d.stubs()
        misses = 0
        try:
            for i in range(per_thread):
                for ns, durable in ((dur, True), (plain, False)):
                    key = f"t{t}-{i}".encode()
                    data = kvs.payload(L, H, D, T, kvs.FP16, kvs.seed_of(ns, key))
                    try:
                        kvs.put(stub, ns, key, T, data, timeout=60)
                        if durable:
                            with lock:
                                acked.append(key)
                    except grpc.RpcError as e:
                        ok = (e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and
                              (not durable or ("disk tier" in e.details() and
                                               "not stored" in e.details())))
                        with lock:
                            (refused if ok else errors).append((ns, key, e.code(),
                                                                e.details()))
                        if durable and ok:
                            misses += 1
                if misses >= 8:
                    return
        finally:
            ch.close()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
        assert not th.is_alive()


def _present(d, ns, keys):
    out = set()
    for i in range(0, len(keys), 1000):
        part = keys[i:i + 1000]
        r = d.stub.Lookup(pb.KeysRequest(namespace=ns, keys=part), timeout=30)
        out |= {k for k, t in zip(part, r.tiers) if t != kvs.TIER_NONE}
    return out


@pytest.mark.parametrize("budget", ["default", "32M"])
def test_disk_full_keeps_every_acknowledged_durable_block(daemon, tmp_path, capsys, budget):
    data = tmp_path / "fs"
    with kvs.small_filesystem(data, 64) as kind:
        extra = ["--data-dir", data / "kvs", "--stats-interval", 0]
        if budget != "default":
            extra += ["--disk-capacity", budget]
        elif kind is None:  # no small filesystem here: the budget is the limit
            extra += ["--disk-capacity", "48M"]
        d = daemon(host_capacity="16M", extra=extra)
        dur = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, durable=True).spec.name
        plain = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T).spec.name
        acked, refused, errors = [], [], []
        lock = threading.Lock()
        _load(d, dur, plain, 200, acked, refused, errors, lock)
        assert not errors, errors[:5]
        dur_refused = [r for r in refused if r[0] == dur]
        assert dur_refused, "the disk never filled: no durable Put was refused"
        attempted = [f"t{t}-{i}".encode() for t in range(THREADS) for i in range(200)]
        before = _present(d, dur, attempted)
        assert set(acked) <= before, f"{len(set(acked) - before)} acknowledged blocks missing"
        plain_before = _present(d, plain, attempted)
        st = d.stats()
        d.stop()

        d2 = daemon(host_capacity="16M", extra=extra)
        after = _present(d2, dur, attempted)
        missing = set(acked) - after
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged durable blocks lost"
        # The index after the restart is LMDB's: exactly the blocks known before.
        assert after == before, (len(before), len(after))
        for key in acked[::7]:
            want = kvs.payload(L, H, D, T, kvs.FP16, kvs.seed_of(dur, key))
            assert kvs.get(d2.stub, dur, key).data == want
        # Non-durable blocks may be gone (a cache), never wrong.
        for key in sorted(_present(d2, plain, attempted))[:20]:
            want = kvs.payload(L, H, D, T, kvs.FP16, kvs.seed_of(plain, key))
            assert kvs.get(d2.stub, plain, key).data == want
        # Deleting durable blocks makes room for new durable Puts.
        r = d2.stub.Delete(pb.KeysRequest(namespace=dur, keys=acked[:20]))
        assert r.deleted == 20
        kvs.put(d2.stub, dur, b"after-delete", T, kvs.payload(L, H, D, T, kvs.FP16, 1))
        d2.stop()
        disk = next(t for t in st.tiers if t.tier == pb.TIER_DISK)
        _report(capsys, f"\ndisk full ({kind or 'no mount: LMDB map and budget'}, budget "
                f"{budget}): {len(acked)} durable Puts acknowledged, all {len(acked)} back "
                f"after a restart; {len(dur_refused)} durable Puts refused; "
                f"{len(plain_before)} non-durable blocks indexed; disk tier "
                f"{disk.used_bytes >> 20}/{disk.capacity_bytes >> 20} MiB")
