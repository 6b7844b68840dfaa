"""SIGTERM with calls in flight: the daemon drains (new calls UNAVAILABLE "draining",
Health DRAINING), lets the in-flight Put and Get finish, then exits 0 within the drain
timeout."""
import signal
import threading
import time

import grpc

import kvs
from kvs import pb

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def wait_for(pred, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def test_sigterm_drains_in_flight_calls(daemon):
    d = daemon(host_capacity="256M", extra=["--drain-timeout", "10"])
    # 8 MiB blocks: a Get stream much larger than the HTTP/2 windows, so that it is
    # really in flight while the client reads slowly.
    ns = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=64))
    big = ns.payload(64, seed=1)
    kvs.put(d.stub, ns.name, b"big", 64, big)
    small = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=16, T=4))

    # In-flight Put: header + half the payload, then wait for the signal.
    put_data = ns.payload(64, seed=2)
    release = threading.Event()

    def slow_put():
        yield pb.PutChunk(header=pb.PutHeader(namespace=ns.name, key=b"slow", tokens=64,
                                              dtype=kvs.FP16))
        half = len(put_data) // 2
        yield pb.PutChunk(data=put_data[:half])
        release.wait(30)
        for i in range(half, len(put_data), 1 << 20):
            yield pb.PutChunk(data=put_data[i:i + (1 << 20)])

    put_ch, put_stub, _ = d.stubs()
    put_future = put_stub.Put.future(slow_put(), timeout=60)

    # In-flight Get, read slowly on its own channel (no BDP probing: small windows).
    get_ch, get_stub, _ = d.stubs([("grpc.http2.bdp_probe", 0)])
    get_it = get_stub.Get(pb.GetRequest(namespace=ns.name, key=b"big"), timeout=60)
    first = next(get_it)
    assert first.HasField("header")
    got = [next(get_it)]
    time.sleep(0.5)  # let the Put's first half arrive

    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)

    # Health on the existing channel reports DRAINING.
    def draining():
        try:
            return d.health(timeout=2).status == kvs.DRAINING
        except grpc.RpcError:
            return False
    assert wait_for(draining, 5), "Health never reported DRAINING"
    # kvctl status says so, with exit status 1.
    st = d.kvctl("status", timeout=30)
    assert st.returncode == 1, st
    assert b"drain" in (st.stdout + st.stderr).lower(), st

    # New calls are refused with UNAVAILABLE "draining".
    kvs.expect_error(UNAVAILABLE, d.stub.Lookup, pb.KeysRequest(namespace=ns.name, keys=[b"x"]),
                     timeout=5, words="draining")
    kvs.expect_error(UNAVAILABLE, kvs.put, d.stub, small.name, b"new", 4, small.payload(4),
                     timeout=5, words="draining")
    kvs.expect_error(UNAVAILABLE, kvs.get, d.stub, ns.name, b"big", timeout=5, words="draining")
    kvs.expect_error(UNAVAILABLE, d.admin.ListNamespaces, pb.ListNamespacesRequest(), timeout=5,
                     words="draining")
    # A brand-new connection is refused one way or another: UNAVAILABLE either way.
    ch2, stub2, _ = d.stubs()
    with ch2:
        e = kvs.rpc_error(stub2.Exists, pb.KeysRequest(namespace=ns.name, keys=[b"x"]),
                          timeout=5)
        assert e.code() == UNAVAILABLE, (e.code(), e.details())
    assert d.proc.poll() is None, "daemon exited with calls in flight"

    # The in-flight Put completes, and the stored block is the one sent.
    time.sleep(0.5)
    release.set()
    r = put_future.result(timeout=30)
    assert r.raw_bytes == len(put_data)
    assert r.tier == kvs.TIER_HOST
    # The Get, not yet read, still holds the daemon in its drain.
    time.sleep(1.0)
    assert d.proc.poll() is None, "daemon exited before the in-flight Get was read"
    for c in get_it:
        got.append(c)
        time.sleep(0.001)
    kvs.check_get_chunks(first.header, got)
    assert b"".join(c.data for c in got) == big

    # Then the daemon exits 0, within the drain timeout.
    rc = d.wait(timeout=15)
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit {rc}\n{d.stderr_text()}"
    assert elapsed < 12, f"took {elapsed:.1f}s to exit"
    put_ch.close()
    get_ch.close()


def test_drain_timeout_cuts_stuck_calls(daemon):
    """A Put that never finishes does not keep the daemon alive past --drain-timeout."""
    d = daemon(extra=["--drain-timeout", "2"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=16, T=4))
    release = threading.Event()
    ch, f = kvs.stuck_put(d, ns, release)
    time.sleep(0.3)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        rc = d.wait(timeout=10)
        elapsed = time.monotonic() - t0
        assert rc == 0, f"exit {rc}\n{d.stderr_text()}"
        assert 1.5 <= elapsed < 6, f"exited after {elapsed:.1f}s with --drain-timeout 2"
        e = f.exception(timeout=10)
        assert e is not None and e.code() != grpc.StatusCode.OK
    finally:
        release.set()
        ch.close()


def test_sigint_idle_exits_0(daemon):
    d = daemon()
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGINT)
    assert d.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 5


def test_second_signal_cuts_drain_short(daemon):
    """A second SIGTERM during the drain skips the rest of the wait (main.c)."""
    d = daemon(extra=["--drain-timeout", "60"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=16, T=4))
    release = threading.Event()

    def stuck():
        yield pb.PutChunk(header=pb.PutHeader(namespace=ns.name, key=b"k", tokens=4,
                                              dtype=kvs.FP16))
        release.wait(30)

    ch, stub, _ = d.stubs()
    f = stub.Put.future(stuck(), timeout=30)
    try:
        time.sleep(0.3)
        d.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: d.health(timeout=2).status == kvs.DRAINING, 5)
        time.sleep(0.5)
        assert d.proc.poll() is None, "exited with a call in flight and 60 s of drain left"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.wait(timeout=10)
        assert rc == 0, f"exit {rc}\n{d.stderr_text()}"
        assert time.monotonic() - t0 < 5
        assert f.exception(timeout=10) is not None
    finally:
        release.set()
        ch.close()
