"""Observability (issue 14 item 4, README "Observability"): the HTTP endpoint of
--metrics-listen (/metrics in the Prometheus text format, checked by promtool, with counters
that move as traffic is driven; /healthz, /readyz, 404 and 405), sd_notify readiness, watchdog
and stopping on an emulated notify socket, and --log-format json."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

import kvs

pb = kvs.pb
PROMTOOL = shutil.which("promtool")


def free_port():
    """A TCP port free on 127.0.0.1 now (the daemon binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, path, method="GET"):
    """(status, body) of one request."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type", "")


def _unescape(v):
    return v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse(text):
    """{(name, ((label, value), ...)): float} of every sample (labels sorted)."""
    import re
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert m, f"unparsable sample line {line!r}"
        labels = tuple(sorted((k, _unescape(v)) for k, v in
                              re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                         m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def val(samples, name, **labels):
    """A sample's value, 0 when absent (a counter not yet created)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels):
    """Sum over every sample of name whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def scrape(port):
    status, body, ctype = http(port, "/metrics")
    assert status == 200, (status, body)
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    return body, parse(body)


def metrics_daemon(daemon, extra=(), env=None):
    port = free_port()
    d = daemon(extra=["--metrics-listen", f"127.0.0.1:{port}", *extra], env=env)
    return d, port


def test_metrics_format_and_counters(daemon):
    d, port = metrics_daemon(daemon)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=16, T=4))
    text0, m0 = scrape(port)

    data = ns.payload(seed=1)
    kvs.put(d.stub, ns.name, b"k1", 4, data)
    got = kvs.get(d.stub, ns.name, b"k1")
    assert got.data == data
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, b"absent")
    # An error of another code: a Put of more tokens than a block holds.
    kvs.expect_error(grpc.StatusCode.INVALID_ARGUMENT, kvs.put, d.stub, ns.name, b"k2", 99,
                     data)
    text1, m1 = scrape(port)

    def moved(name, **labels):
        return val(m1, name, **labels) - val(m0, name, **labels)

    # Per namespace: one hit (whichever tier answered), one miss.
    hits = total(m1, "kvstash_namespace_hits_total", namespace=ns.name) - \
        total(m0, "kvstash_namespace_hits_total", namespace=ns.name)
    assert hits == 1, text1
    assert moved("kvstash_namespace_misses_total", namespace=ns.name) == 1
    assert val(m1, "kvstash_namespace_blocks", namespace=ns.name) == 1
    assert val(m1, "kvstash_namespace_raw_bytes", namespace=ns.name) == len(data)
    assert val(m1, "kvstash_namespace_compression_ratio", namespace=ns.name) > 0
    assert total(m1, "kvstash_tier_hits_total") - total(m0, "kvstash_tier_hits_total") == 1
    assert moved("kvstash_misses_total") == 1
    # RPCs: counts, errors, status codes, latency histogram.
    assert moved("kvstash_rpc_calls_total", method="Put") == 2
    assert moved("kvstash_rpc_calls_total", method="Get") == 2
    assert moved("kvstash_rpc_errors_total", method="Get") == 1
    assert moved("kvstash_rpc_errors_total", method="Put") == 1
    assert moved("kvstash_rpc_responses_total", method="Get", code="OK") == 1
    assert moved("kvstash_rpc_responses_total", method="Get", code="NOT_FOUND") == 1
    assert moved("kvstash_rpc_responses_total", method="Put", code="OK") == 1
    assert moved("kvstash_rpc_responses_total", method="Put", code="INVALID_ARGUMENT") == 1
    assert moved("kvstash_rpc_duration_seconds_count", method="Put") == 2
    assert moved("kvstash_rpc_duration_seconds_bucket", method="Get", le="+Inf") == 2
    assert moved("kvstash_rpc_duration_seconds_sum", method="Get") > 0
    # Bytes in and out, and the tiers' use.
    assert moved("kvstash_payload_bytes_total", direction="in", path="wire") == len(data)
    assert moved("kvstash_payload_bytes_total", direction="out", path="wire") == len(data)
    assert total(m1, "kvstash_tier_used_bytes") > total(m0, "kvstash_tier_used_bytes")
    assert total(m1, "kvstash_tier_blocks") == total(m0, "kvstash_tier_blocks") + 1
    assert val(m1, "kvstash_tier_capacity_bytes", tier="host") == 256 << 20
    # Codec work: one encode (the Put that succeeded), one decode (the Get that hit), on
    # the CPU pool or the GPU engine, whichever ran it.
    for op in ("encode", "decode"):
        assert total(m1, "kvstash_codec_ops_total", op=op) - \
            total(m0, "kvstash_codec_ops_total", op=op) == 1, op
        assert total(m1, "kvstash_codec_raw_bytes_total", op=op) - \
            total(m0, "kvstash_codec_raw_bytes_total", op=op) == len(data), op
        assert total(m1, "kvstash_codec_encoded_bytes_total", op=op) - \
            total(m0, "kvstash_codec_encoded_bytes_total", op=op) > 0, op
        assert total(m1, "kvstash_codec_seconds_total", op=op) > \
            total(m0, "kvstash_codec_seconds_total", op=op), op

    # MHD's own complaints come to our log as "metrics: ..." warnings: none expected.
    assert " WARN metrics:" not in d.stderr_text(), d.stderr_text()
    if not PROMTOOL:
        pytest.skip("promtool not installed (Debian package prometheus; deploy/dev.sh "
                    "installs it): format check skipped, counters checked")
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text1, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"promtool check metrics:\n{r.stdout}{r.stderr}\n---\n{text1}"


def test_endpoints_and_drain(daemon):
    d, port = metrics_daemon(daemon, extra=["--drain-timeout", "20"])
    assert http(port, "/healthz")[:2] == (200, "ok\n")
    assert http(port, "/readyz")[0] == 200
    assert http(port, "/nope")[0] == 404
    assert http(port, "/metrics/x")[0] == 404
    assert http(port, "/metrics", method="POST")[0] == 405
    assert http(port, "/metrics", method="HEAD")[0] == 200

    # A Put that holds the drain open: /readyz says 503 while the process still serves
    # /healthz and /metrics.
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=16, T=4))
    release = threading.Event()
    ch, f = kvs.stuck_put(d, ns, release)
    try:
        kvs.wait_for(lambda: val(scrape(port)[1], "kvstash_rpc_inflight") >= 1, "Put in flight")
        d.proc.send_signal(signal.SIGTERM)
        kvs.wait_for(lambda: http(port, "/readyz")[0] == 503, "/readyz 503 while draining")
        assert http(port, "/healthz")[0] == 200
        assert scrape(port)[1]  # still rendering
        assert d.proc.poll() is None
    finally:
        release.set()
    assert d.wait(timeout=30) == 0
    f.exception(timeout=10)
    ch.close()
    d.stop()


def test_metrics_listen_refused(tmp_path):
    """A port already taken: the daemon does not start, and says which flag."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--metrics-listen",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--metrics-listen" in r.stderr, r.stderr
    r = subprocess.run([kvs.KVSTASHD, "--metrics-listen", "nonsense", "--print-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'metrics_listen: "nonsense"' in r.stdout  # checked at bind
    r = subprocess.run([kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--metrics-listen",
                        "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--metrics-listen" in r.stderr, r.stderr


def _recv_notify(sock):
    """(sender pid, [lines]) of one datagram on a SO_PASSCRED notify socket."""
    msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", data[:12])[0]
    return pid, msg.decode().split("\n")


def test_sd_notify_ready_watchdog_stopping(tmp_path):
    """What deploy/systemd/kvstashd.service relies on (Type=notify, NotifyAccess=main,
    WatchdogSec): READY=1 only once the gRPC port accepts and /readyz answers 200; every
    notification from the main process (NotifyAccess=main drops the others); WATCHDOG=1
    at half of WATCHDOG_USEC, never a gap of a whole interval (systemd would kill it);
    STOPPING=1 on SIGTERM, then exit 0 (Restart=on-failure leaves it stopped)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    sock.settimeout(20)
    interval = 1.0  # WATCHDOG_USEC, seconds
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(int(interval * 1e6)))
    env.pop("WATCHDOG_PID", None)  # unset: sd_watchdog_enabled takes the pings as ours
    port_file, mport = tmp_path / "port", free_port()
    err = open(tmp_path / "kvstashd.stderr", "wb")
    proc = kvs.spawn([kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                      "--metrics-listen", f"127.0.0.1:{mport}", "--host-capacity", "64M",
                      "--stats-interval", "0", *kvs.KVSTASHD_EXTRA],
                     stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
    try:
        pid, lines = _recv_notify(sock)
        assert "READY=1" in lines, lines
        assert pid == proc.pid, (pid, proc.pid)
        assert any(x.startswith("STATUS=serving") for x in lines), lines
        # Ready means ready: the port is written, accepts, and /readyz says so.
        port = int(port_file.read_text())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert http(mport, "/readyz")[0] == 200
        pings, deadline = [], time.monotonic() + 3.2 * interval
        while time.monotonic() < deadline:
            pid, lines = _recv_notify(sock)
            assert pid == proc.pid, (pid, proc.pid, lines)
            if "WATCHDOG=1" in lines:
                pings.append(time.monotonic())
        gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
        assert len(pings) >= 5, f"{len(pings)} pings in {3.2 * interval} s"
        assert gaps[len(gaps) // 2] <= 0.6 * interval, f"pings every {gaps} s, not half of {interval}"
        assert gaps[-1] < interval, f"a gap of {gaps[-1]} s: systemd's watchdog would fire"
        proc.send_signal(signal.SIGTERM)
        got = []
        while "STOPPING=1" not in got:
            pid, lines = _recv_notify(sock)
            assert pid == proc.pid, (pid, proc.pid, lines)
            got += lines
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
        sock.close()


def test_no_watchdog_for_another_pid(daemon, tmp_path):
    """WATCHDOG_PID naming another process: the pings are not ours to send."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="100000",
               WATCHDOG_PID=str(os.getpid()))
    try:
        daemon(env=env)
        got = []
        try:
            while True:
                got += sock.recv(4096).decode().split("\n")
        except socket.timeout:
            pass
        assert "READY=1" in got and "WATCHDOG=1" not in got, got
    finally:
        sock.close()


def test_json_logs(daemon):
    d = daemon(extra=["--log-format", "json", "--log-level", "debug"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=16, T=4))
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, kvs.get, d.stub, ns.name, b"absent")
    d.stop()
    lines = [x for x in d.stderr_text(limit=1 << 30).splitlines() if x.strip()]
    assert len(lines) >= 3
    objs = []
    for line in lines:
        o = json.loads(line)  # every line is one JSON object
        assert {"ts", "level", "component", "msg"} <= set(o), o
        assert o["level"] in ("error", "warn", "info", "debug"), o
        assert o["ts"].endswith("Z") and "T" in o["ts"], o
        objs.append(o)
    assert any(o["component"] == "daemon" and "listening on" in o["msg"] for o in objs)
    calls = [o for o in objs if o["component"] == "call"]
    assert any(o["method"] == "Get" and isinstance(o["call_id"], int) and
               "NOTFOUND" in o["msg"] for o in calls), calls
    assert objs[-1]["msg"] == "kvstashd stopped", objs[-1]
