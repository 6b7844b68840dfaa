"""kvstashd's config file (README "Config file"): values from the file reach the daemon's
behaviour, flags win over it, unknown keys and bad values are refused naming FILE:LINE
and the key, --print-config round-trips, and SIGHUP applies the live keys (log level,
host capacity, tokens), keeps restart-only ones, and survives a broken file."""
import os
import re
import signal
import subprocess
import time

import grpc
import pytest

import kvs
from kvs import pb

MiB = 1 << 20


def run_daemon(*args, timeout=10, env=None):
    e = dict(os.environ)
    for k in ("KVSTASHD_CONFIG", "KVSTASH_TOKEN", "KVSTASH_ADMIN_TOKEN"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([kvs.KVSTASHD, *args], capture_output=True, timeout=timeout, env=e)


def values(text):
    """{key: value} of a --print-config output (comments dropped)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(\w+): (".*"|\S+)  # (.*)$', line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def sources(text):
    return {m.group(1): m.group(3) for m in
            (re.match(r'^(\w+): (".*"|\S+)  # (.*)$', ln) for ln in text.splitlines()) if m}


def nine_keys(d, ns):
    return d.stub.Lookup(pb.KeysRequest(namespace=ns, keys=[bytes([i + 1]) for i in range(9)]))


def test_file_sets_values(daemon, tmp_path):
    cfg = tmp_path / "kvstashd.yaml"
    cfg.write_text("# test\nhost_capacity: 96M\nmax_keys: 8\n")
    d = daemon(host_capacity=None, extra=["--config", cfg])
    assert d.host_tier().capacity_bytes == 96 * MiB
    ns = kvs.Ns(kvs.make_ns(d.admin)).name
    e = kvs.rpc_error(nine_keys, d, ns)
    assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED), e.code()


def test_flag_wins(daemon, tmp_path):
    cfg = tmp_path / "kvstashd.yaml"
    cfg.write_text("host_capacity: 96M\nmax_keys: 8\n")
    d = daemon(host_capacity=None, extra=["--config", cfg, "--host-capacity", "80M"])
    assert d.host_tier().capacity_bytes == 80 * MiB
    r = run_daemon("--config", str(cfg), "--host-capacity", "80M", "--print-config")
    assert r.returncode == 0, r
    src = sources(r.stdout.decode())
    assert values(r.stdout.decode())["host_capacity"] == "80M"
    assert src["host_capacity"] == "flag --host-capacity", src
    assert src["max_keys"] == f"file {cfg}:2", src
    assert src["threads"] == "default", src


def test_env_config_path(tmp_path):
    cfg = tmp_path / "kvstashd.yaml"
    cfg.write_text("host_capacity: 96M\n")
    r = run_daemon("--print-config", env={"KVSTASHD_CONFIG": str(cfg)})
    assert r.returncode == 0, r
    assert values(r.stdout.decode())["host_capacity"] == "96M"


@pytest.mark.parametrize("text,line,key,words", [
    ("host_capacity: 1G\n\nfrobnicate: 3\n", 3, "frobnicate", "unknown key"),
    ("log_level: info\nhost_capacity: 12X\n", 2, "host_capacity", "is not a size"),
    ("eviction: mru\n", 1, "eviction", "is not lru or s3fifo"),
    ("max_keys: 1\nmax_keys: 2\n", 2, "max_keys", "given twice"),
    ("threads:\n  - 1\n", 2, "threads", "not a list"),
])
def test_bad_file_refused(tmp_path, text, line, key, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = run_daemon("--listen", "127.0.0.1:0", "--config", str(cfg))
    assert r.returncode not in (0, None) and r.returncode > 0, r
    err = r.stderr.decode()
    assert f"{cfg}:{line}: {key}" in err, err
    assert words in err, err
    # --print-config checks the file as well.
    assert run_daemon("--config", str(cfg), "--print-config").returncode != 0


def test_missing_file_refused(tmp_path):
    r = run_daemon("--config", str(tmp_path / "none.yaml"))
    assert r.returncode != 0 and b"none.yaml" in r.stderr, r


def test_print_config_roundtrip(tmp_path):
    cfg = tmp_path / "in.yaml"
    cfg.write_text("host_capacity: 96M\neviction: s3fifo\nhost_watermarks: 70,30\n"
                   "listen: \"unix:/tmp/x y.sock\"\ngpu_capacity: 1G\n")
    r1 = run_daemon("--config", str(cfg), "--log-level", "debug", "--max-keys", "77",
                    "--token", "hunter2", "--print-config")
    assert r1.returncode == 0, r1
    t1 = r1.stdout.decode()
    assert "hunter2" not in t1 and values(t1)["token"] == '"<set>"', t1
    v1 = values(t1)
    assert len(v1) >= 32 and v1["max_keys"] == "77" and v1["log_level"] == "debug", v1
    # The printout loads back (the token placeholder aside: it is refused as a token).
    out = tmp_path / "printed.yaml"
    out.write_text(t1.replace('token: "<set>"', 'token: ""'))
    r2 = run_daemon("--config", str(out), "--print-config")
    assert r2.returncode == 0, r2
    v2 = values(r2.stdout.decode())
    v1["token"] = '""'
    assert v2 == v1
    assert all(s.startswith(f"file {out}:") for s in sources(r2.stdout.decode()).values())
    out.write_text(t1)
    r3 = run_daemon("--config", str(out))
    assert r3.returncode != 0 and b"token" in r3.stderr, r3


def refused(fn, *args, **kw):
    """True if fn(...) fails with UNAUTHENTICATED, False if it succeeds."""
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        return True
    return False


def test_sighup_reload(daemon, tmp_path):
    cfg = tmp_path / "kvstashd.yaml"
    cfg.write_text("log_level: info\nhost_capacity: 128M\ntoken: old-token\n"
                   "admin_token: old-admin\nmax_keys: 4096\n")
    d = daemon(host_capacity=None, extra=["--config", cfg], token="old-admin")
    old, new = kvs.bearer("old-admin"), kvs.bearer("new-admin")
    assert d.host_tier(old).capacity_bytes == 128 * MiB
    ns = kvs.Ns(kvs.make_ns(d.admin, metadata=old)).name
    # Live keys change, a restart-only key (max_keys) is reported and kept.
    cfg.write_text("log_level: warn\nhost_capacity: 64M\ntoken: new-token\n"
                   "admin_token: new-admin\nmax_keys: 8\n")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: "SIGHUP: max_keys" in d.stderr_text(), "the reload's log")
    kvs.wait_for(lambda: refused(d.stats, old), "the old admin token refused")
    assert d.host_tier(new).capacity_bytes == 64 * MiB
    log = d.stderr_text()
    assert "SIGHUP: log_level: info -> warn" in log, log
    assert "SIGHUP: host_capacity: 128M -> 64M" in log, log
    assert re.search(r"SIGHUP: token: <set> -> <set>", log), log
    assert "new-token" not in log and "old-token" not in log, log
    assert re.search(r"SIGHUP: max_keys: 4096 -> 8 .*needs a restart", log), log
    # Tokens: the old client token is refused, the new one accepted.
    req = pb.KeysRequest(namespace=ns, keys=[b"k"])
    e = kvs.rpc_error(d.stub.Lookup, req, metadata=kvs.bearer("old-token"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    d.stub.Lookup(req, metadata=kvs.bearer("new-token"))
    # max_keys kept its running value: 9 keys still pass.
    d.stub.Lookup(pb.KeysRequest(namespace=ns, keys=[bytes([i + 1]) for i in range(9)]),
                  metadata=kvs.bearer("new-token"))
    # The log level is warn now: the reload's INFO summary line no longer appears.
    n_info = d.stderr_text().count("SIGHUP: reloaded")
    cfg.write_text("log_level: warn\nhost_capacity: 64M\ntoken: new-token\n"
                   "admin_token: new-admin\nmax_keys: 8\ndrain_timeout: 5\n")
    d.proc.send_signal(signal.SIGHUP)
    d.proc.send_signal(signal.SIGHUP)  # a second one: nothing changes, still alive
    time.sleep(0.5)
    assert d.stderr_text().count("SIGHUP: reloaded") == n_info
    assert d.proc.poll() is None
    # A broken file is refused whole: nothing changes, the daemon keeps serving.
    cfg.write_text("log_level: debug\nhost_capacity: 32M\ntoken: other\nbogus_key: 1\n")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: "config refused" in d.stderr_text(), "the refusal in the log")
    log = d.stderr_text()
    assert f"{cfg}:4: bogus_key" in log, log
    assert d.proc.poll() is None
    assert d.host_tier(new).capacity_bytes == 64 * MiB
    d.stub.Lookup(req, metadata=kvs.bearer("new-token"))
    # Back to info: the next reload logs its summary again.
    cfg.write_text("log_level: info\nhost_capacity: 64M\ntoken: new-token\n"
                   "admin_token: new-admin\n")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: d.stderr_text().count("SIGHUP: reloaded") > n_info, "info lines again")
    d.token = "new-admin"  # for the fixture's teardown


def test_sighup_host_capacity_evicts(daemon, tmp_path):
    """Shrinking the host tier evicts down to the new capacity, visible in Stats."""
    cfg = tmp_path / "kvstashd.yaml"
    cfg.write_text("host_capacity: 64M\neviction: lru\n")
    d = daemon(host_capacity=None, extra=["--config", cfg, "--gpu", "off"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=4, H=8, D=128, T=16))
    for i in range(40):  # 256 KiB blocks: 10 MiB
        kvs.put(d.stub, ns.name, b"k%d" % i, 16, ns.payload(16, seed=i))
    used = d.host_tier().used_bytes
    assert used > 8 * MiB, used
    cfg.write_text("host_capacity: 4M\neviction: s3fifo\n")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: d.host_tier().capacity_bytes == 4 * MiB, "the new capacity")
    t = d.host_tier()
    assert t.used_bytes <= 4 * MiB, t
    assert "SIGHUP: eviction: lru -> s3fifo" in d.stderr_text()
    # Still serving with the new policy: Puts evict within the new budget.
    for i in range(40, 60):
        kvs.put(d.stub, ns.name, b"k%d" % i, 16, ns.payload(16, seed=i))
    assert d.host_tier().used_bytes <= 4 * MiB
    assert kvs.get(d.stub, ns.name, b"k59").data == ns.payload(16, seed=59)


def test_sighup_without_file(daemon):
    d = daemon()
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: "nothing to reload" in d.stderr_text(), "the SIGHUP line")
    assert d.proc.poll() is None
