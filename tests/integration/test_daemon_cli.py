"""kvstashd's command line: --help/--version, bad flags refused with a message naming
the flag, a taken port, and flags that change limits (--max-keys, --threads 1)."""
import os
import socket
import subprocess
import time

import grpc
import pytest

import kvs
from kvs import pb


def run_daemon(*args, timeout=10):
    return subprocess.run([kvs.KVSTASHD, *args], capture_output=True, timeout=timeout)


@pytest.mark.parametrize("flag", ["--help", "-h", "--version"])
def test_help_version(flag):
    r = run_daemon(flag)
    assert r.returncode == 0, r
    assert r.stdout.strip(), r


@pytest.mark.parametrize("args,names", [
    (["--host-capacity", "12X"], "--host-capacity"),
    (["--host-capacity", "0"], "--host-capacity"),
    (["--max-message", "1"], "--max-message"),
    (["--threads", "0"], "--threads"),
    (["--log-level", "loud"], "--log-level"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--max-keys", "0"], "--max-keys"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--listen"], "--listen"),
    (["stray"], "stray"),
])
def test_bad_flags(args, names):
    r = run_daemon("--listen", "127.0.0.1:0", *args)
    assert r.returncode not in (0, None) and r.returncode > 0, r
    assert names.encode() in r.stderr, r.stderr


def test_port_in_use(tmp_path):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        pf = tmp_path / "port"
        r = run_daemon("--listen", f"127.0.0.1:{port}", "--port-file", str(pf))
        assert r.returncode != 0, r
        assert r.stderr.strip(), r
        assert not pf.exists()
    finally:
        s.close()


def test_max_keys_flag(daemon):
    d = daemon(extra=["--max-keys", "8"])
    ns = kvs.Ns(kvs.make_ns(d.admin))
    keys = [bytes([i + 1]) for i in range(9)]
    assert len(d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=keys[:8])).tiers) == 8
    for rpc in (d.stub.Lookup, d.stub.Exists, d.stub.Delete):
        e = kvs.rpc_error(rpc, pb.KeysRequest(namespace=ns.name, keys=keys))
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.RESOURCE_EXHAUSTED), e.code()
        assert "keys" in e.details(), e.details()


def test_one_thread(daemon):
    """--threads 1 serves the same bytes (including a multi-chunk Get)."""
    d = daemon(extra=["--threads", "1", "--log-level", "debug"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))
    p = ns.payload(16, seed=8)
    kvs.put(d.stub, ns.name, b"k", 16, p)
    assert kvs.get(d.stub, ns.name, b"k").data == p


def test_token_from_environment(tmp_path):
    """KVSTASH_TOKEN keeps the token out of the process list."""
    env = dict(os.environ, KVSTASH_TOKEN="envtok")
    pf = tmp_path / "port"
    p = subprocess.Popen([kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--port-file", str(pf)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (pf.exists() and pf.read_text().strip()) and time.monotonic() < deadline:
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.02)
        target = f"127.0.0.1:{int(pf.read_text())}"
        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            stub = kvs.pb_grpc.KvStashStub(ch)
            req = pb.KeysRequest(namespace="x", keys=[b"k"])
            kvs.expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.Lookup, req, timeout=5)
            # Right token: past auth, to the namespace check.
            kvs.expect_error(grpc.StatusCode.NOT_FOUND, stub.Lookup, req, timeout=5,
                             metadata=kvs.bearer("envtok"), words="namespace")
    finally:
        p.terminate()
        assert p.wait(20) == 0
        p.stderr.close()


@pytest.fixture
def unix_daemon(tmp_path):
    """kvstashd on a Unix socket (DESIGN §9: for co-located workers)."""
    sock = tmp_path / "kvstash.sock"
    err = open(tmp_path / "stderr", "wb")
    p = subprocess.Popen([kvs.KVSTASHD, "--listen", f"unix:{sock}", "--host-capacity", "64M"],
                         stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert p.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "no socket after 20 s"
            time.sleep(0.02)
        yield sock, p
    finally:
        if p.poll() is None:
            p.terminate()
        rc = p.wait(20)
        err.close()
        assert rc == 0, (tmp_path / "stderr").read_text()
        assert not sock.exists(), "socket file left behind"


def test_unix_socket(unix_daemon, tmp_path):
    sock, _ = unix_daemon
    target = f"unix:{sock}"
    with grpc.insecure_channel(target) as ch:
        stub, admin = kvs.pb_grpc.KvStashStub(ch), kvs.pb_grpc.KvAdminStub(ch)
        grpc.channel_ready_future(ch).result(timeout=10)
        assert admin.Health(pb.HealthRequest(), timeout=5).status == kvs.SERVING
        ns = kvs.Ns(kvs.make_ns(admin, L=2, H=2, D=16, T=4))
        p = ns.payload(4, seed=1)
        kvs.put(stub, ns.name, b"u", 4, p)
        assert kvs.get(stub, ns.name, b"u").data == p
        # kvctl over the same socket.
        out = tmp_path / "o.bin"
        r = kvs.run_kvctl("--target", target, "get", ns.name, "u", out)
        assert r.returncode == 0, r
        assert out.read_bytes() == p


def test_unix_socket_mode(unix_daemon):
    sock, _ = unix_daemon
    assert oct(os.stat(sock).st_mode & 0o777) == oct(0o660)


def test_unix_socket_never_wider_than_0660(tmp_path):
    """The socket is created with its final mode (a umask around bind), not created with
    the process's umask and chmod'ed after: no window in which others may connect. The
    shim records the mode at the instant of bind(); the test runs the daemon with umask
    0 so that a socket made without the fix would be 0777 at that instant."""
    if kvs.SANITIZED:
        pytest.skip("a sanitizer build cannot run under an LD_PRELOAD shim")
    shim = os.environ.get("KVS_BINDMODE") or os.path.join(
        kvs.REPO, "build", "lib", "libkvs_bindmode.so")
    if not os.path.exists(shim):
        pytest.skip(f"bind shim not built: {shim}")
    sock = tmp_path / "k.sock"
    out = tmp_path / "bindmode"
    env = dict(os.environ, LD_PRELOAD=shim, KVS_BINDMODE_OUT=str(out))
    p = subprocess.Popen([kvs.KVSTASHD, "--listen", f"unix:{sock}", "--host-capacity", "64M"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: os.umask(0))
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "no socket after 20 s"
            time.sleep(0.02)
    finally:
        p.terminate()
        assert p.wait(20) == 0
        p.stderr.close()
    lines = [ln.split(" ", 1) for ln in out.read_text().splitlines()]
    mine = [int(m, 8) for m, path in lines if path == str(sock)]
    assert mine, f"bind of {sock} not seen: {lines}"
    assert all(m & 0o777 == 0o660 for m in mine), [oct(m) for m in mine]
