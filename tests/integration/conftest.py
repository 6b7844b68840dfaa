"""Fixtures for the kvstash integration tests (DESIGN §13).

At import (session start) kvs.py generates the Python messages and stubs from proto/
with Debian's protoc and grpc_python_plugin and imports them.

Fixtures:
  daemon          factory: daemon(host_capacity="256M", extra=[...], token=None,
                  credentials=None, env=None, listen="127.0.0.1:0") (credentials: a grpcio
                  secure channel's; env: the daemon's whole environment, None for the
                  test's) starts `$KVSTASHD --listen <listen> --port-file <tmp>/port
                  --host-capacity <cap> [extra]`, waits for the port file and for Health =
                  SERVING, and returns a kvs.Daemon (.target .proc .stub .admin .kvctl(*args)). At
                  teardown each one gets SIGTERM and must exit 0 within 20 s.
  module_daemon   the same factory, with daemons shared by one test module.
On any failure, the stderr of every daemon still running is attached to the report; a
sanitizer report in a daemon's stderr (KVS_SANITIZE builds) fails the test that caused it.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvs  # noqa: E402  (generates and imports the wire at session start)


def pytest_report_header(config):
    return [f"kvstashd: {kvs.KVSTASHD}", f"kvctl: {kvs.KVCTL}",
            f"proto: {kvs.PROTO_DIR} -> {os.path.dirname(kvs.pb.__file__)}"]


def _factory(tmp_path_factory, label):
    started = []

    def start(host_capacity="256M", extra=(), token=None, credentials=None, env=None,
              listen="127.0.0.1:0"):
        workdir = tmp_path_factory.mktemp(label)
        d = kvs.Daemon(str(workdir), host_capacity=host_capacity, extra=extra, token=token,
                       credentials=credentials, env=env, listen=listen)
        started.append(d)
        return d

    def finish():
        errors = []
        for d in started:
            try:
                d.stop(timeout=20)
            except Exception as e:  # keep stopping the others
                errors.append(str(e))
        assert not errors, "\n\n".join(errors)

    return start, finish


@pytest.fixture
def daemon(tmp_path_factory):
    start, finish = _factory(tmp_path_factory, "kvstashd")
    yield start
    finish()


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory):
    start, finish = _factory(tmp_path_factory, "kvstashd-mod")
    yield start
    finish()


@pytest.fixture(autouse=True)
def _sanitizer_watch():
    """Fails the test during which a running daemon (a sanitizer build) wrote a
    sanitizer report, rather than the last test of the module that shares it."""
    for d in kvs.live_daemons():
        d.new_sanitizer_report()  # skip what earlier tests caused
    yield
    found = [(d.target, r) for d in kvs.live_daemons() if (r := d.new_sanitizer_report())]
    assert not found, f"sanitizer report in kvstashd stderr during this test: {found}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for d in kvs.live_daemons():
            rep.sections.append((f"kvstashd {getattr(d, 'target', '?')} stderr",
                                 d.stderr_text()))
