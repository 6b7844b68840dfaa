"""Helpers shared by the deployment checks (tests/deploy/check_*.py): the daemon's own view
of a config file (kvstashd --print-config), a short-lived kvstashd on free loopback ports,
HTTP GETs against it, and a collector of failures that lets one run report every problem
it finds instead of the first.

Each check_*.py also has a self-test (--self-test): it breaks a copy of the artefact in
ways an edit could (a misspelled key, a port that no longer matches, a probe path that
does not exist) and asserts the checks catch each one, so that no check passes vacuously.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SKIP = 77  # ctest SKIP_RETURN_CODE

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEPLOY = os.path.join(REPO, "deploy")


class Failures:
    """Collects failed checks; `check(cond, msg)` records msg when cond is false."""

    def __init__(self, label):
        self.label = label
        self.msgs = []
        self.passed = 0

    def check(self, cond, msg):
        if cond:
            self.passed += 1
        else:
            self.msgs.append(msg)
        return bool(cond)

    def fail(self, msg):
        self.msgs.append(msg)

    def report(self):
        """Prints the outcome; returns the exit status (0 all passed, 1 otherwise)."""
        for m in self.msgs:
            print(f"FAIL {self.label}: {m}")
        print(f"{self.label}: {self.passed} passed, {len(self.msgs)} failed")
        return 1 if self.msgs else 0


# ------------------------------------------------------------------ kvstashd's view

_PRINT_RE = re.compile(r'^([a-z_]+): ("(?:[^"\\]|\\.)*"|\S+)\s+# (.+)$')


def parse_print_config(text):
    """{key: (value, source)} from `kvstashd --print-config` output."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PRINT_RE.match(line)
        if not m:
            raise ValueError(f"unexpected --print-config line: {line!r}")
        v = m.group(2)
        if v.startswith('"'):
            v = bytes(v[1:-1], "utf-8").decode("unicode_escape")
        out[m.group(1)] = (v, m.group(3))
    return out


def print_config(kvstashd, args, env=None):
    """(returncode, {key: (value, source)} or None, stderr) of `kvstashd ARGS --print-config`."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("KVSTASHD_CONFIG", "KVSTASH_TOKEN", "KVSTASH_ADMIN_TOKEN")}
    e.update(env or {})
    r = subprocess.run([kvstashd, *args, "--print-config"], capture_output=True, text=True,
                       timeout=60, env=e)
    return r.returncode, parse_print_config(r.stdout) if r.returncode == 0 else None, r.stderr


def flag_names(kvstashd):
    """Every long option `kvstashd --help` lists (without the dashes)."""
    r = subprocess.run([kvstashd, "--help"], capture_output=True, text=True, timeout=60)
    return set(re.findall(r"^\s+(?:-h, )?--([a-z][a-z0-9-]*)", r.stdout, re.M))


def port_of(addr):
    """The port of HOST:PORT or [V6]:PORT, as an int; None for unix: or no port."""
    if not addr or addr.startswith("unix:"):
        return None
    m = re.fullmatch(r"(?:\[[^\]]+\]|[^:]*):(\d+)", addr)
    return int(m.group(1)) if m else None


def host_of(addr):
    m = re.fullmatch(r"(?:\[([^\]]+)\]|([^:]*)):\d+", addr or "")
    return (m.group(1) or m.group(2)) if m else None


def size_bytes(s):
    """kvstashd's SIZE syntax (2G, 512M, 2GiB, bytes); None for auto or garbage."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)(i?B)?", str(s).strip())
    if not m:
        return None
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return int(m.group(1)) << shift


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5):
    """(status, body) of GET http://127.0.0.1:PORT/PATH; (None, error) if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


@contextlib.contextmanager
def running_daemon(kvstashd, args, workdir, metrics_port, timeout=30, env=None):
    """kvstashd ARGS in the background until /readyz answers 200 on metrics_port; yields
    the Popen. Stopped with SIGTERM at exit (it must exit 0 then)."""
    log = open(os.path.join(workdir, "kvstashd.log"), "wb")
    e = {k: v for k, v in os.environ.items()
         if k not in ("KVSTASHD_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    e.update(env or {})
    p = subprocess.Popen([os.path.abspath(kvstashd), *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         cwd=workdir, env=e)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"kvstashd exited {p.returncode}: {read_log(workdir)}")
            if http_get(metrics_port, "/readyz", timeout=1)[0] == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvstashd not ready in {timeout}s: {read_log(workdir)}")
            time.sleep(0.1)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise RuntimeError("kvstashd did not stop within 30 s of SIGTERM")
            if rc != 0:
                raise RuntimeError(f"kvstashd exited {rc} after SIGTERM: {read_log(workdir)}")
        log.close()


def read_log(workdir):
    with open(os.path.join(workdir, "kvstashd.log"), "rb") as f:
        return f.read().decode("utf-8", "replace")[-4000:]


def tmpdir(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    return d


def rmtree(d):
    shutil.rmtree(d, ignore_errors=True)


def need_tool(name, package):
    """The tool's path, or exit SKIP naming the Debian package that brings it."""
    p = shutil.which(name)
    if not p:
        print(f"SKIP: {name} not installed (Debian package {package}; deploy/dev.sh test "
              f"installs it)")
        sys.exit(SKIP)
    return p
