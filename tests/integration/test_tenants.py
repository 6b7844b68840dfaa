"""Tenant tokens and token files (issue 14 item 2, README "Tenants"): two tenants sharing a
daemon can neither read, overwrite nor test for each other's blocks (Lookup/Exists
included), a namespace they were not granted gets the same PERMISSION_DENIED whether it
exists or not, the KvAdmin calls that concern every tenant are refused to them, SIGHUP
re-reads the tenant file, tokens come from files (the daemon's, kvctl's --token-file, the
Python package's token_file), and missing or wrong tokens are UNAUTHENTICATED."""
import contextlib
import os
import signal
import subprocess

import grpc
import numpy as np
import pytest

import kvs
from kvs import FP16, pb

kvstash = kvs.lazy_client_package()  # Python-package tests skip in a sanitizer build

ADMIN, CLIENT, TA, TB = "admin-from-file", "client-secret", "tenant-a-secret", "tenant-b-secret"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NS_A, NS_A2, NS_B = "tenant-a", "tenant-a-2", "tenant-b"
NO_NS = "tenant-nobody"  # granted to no one, never created
T = 4  # kvs.spec's block_tokens


def write(path, text, mode=0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def tenant_file(path, lines):
    return write(path, "# tenants of this daemon\n\n" + "".join(f"{l}\n" for l in lines))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tenant-files")
    return {"dir": d,
            "admin": write(d / "admin.token", ADMIN + "\n"),
            "tenants": tenant_file(d / "tenants", [f"{NS_A} {TA}", f"{NS_A2} {TA}",
                                                   f"{NS_B}\t{TB}"])}


@pytest.fixture(scope="module")
def td(module_daemon, files):
    """Admin token from a file, a client token, tenants A (two namespaces) and B."""
    d = module_daemon(extra=["--admin-token-file", files["admin"], "--token", CLIENT,
                             "--tenant-tokens", files["tenants"]], token=ADMIN)
    adm = kvs.bearer(ADMIN)
    for name in (NS_A, NS_B):
        d.admin.CreateNamespace(pb.CreateNamespaceRequest(spec=kvs.spec(name)), metadata=adm)
    return d


def payload(seed=0):
    return kvs.payload(2, 2, 16, T, seed=seed)


def put_many_msgs(ns, keys):
    for i, k in enumerate(keys):
        yield pb.PutChunk(header=pb.PutHeader(namespace=ns, key=k, tokens=T, dtype=FP16))
        yield pb.PutChunk(data=payload(i))


def keys_req(ns, keys=(b"k",)):
    return pb.KeysRequest(namespace=ns, keys=list(keys))


def denied_details(fn, *args, **kw):
    e = kvs.rpc_error(fn, *args, **kw)
    assert e.code() == DENIED, (e.code(), e.details())
    return e.details()


def data_calls(d, ns, md):
    """Every KvStash call naming ns, as thunks: (name, call)."""
    return [
        ("Put", lambda: kvs.put(d.stub, ns, b"k", T, payload(), metadata=md)),
        ("PutMany", lambda: d.stub.PutMany(put_many_msgs(ns, [b"k"]), metadata=md,
                                           timeout=30).results),
        ("Get", lambda: kvs.get(d.stub, ns, b"k", metadata=md)),
        ("GetMany", lambda: list(d.stub.GetMany(pb.GetManyRequest(namespace=ns, keys=[b"k"]),
                                                metadata=md, timeout=30))),
        ("Lookup", lambda: d.stub.Lookup(keys_req(ns), metadata=md)),
        ("Exists", lambda: d.stub.Exists(keys_req(ns), metadata=md)),
        ("Delete", lambda: d.stub.Delete(keys_req(ns), metadata=md)),
        ("GetCodecState", lambda: d.stub.GetCodecState(
            pb.CodecStateRequest(namespace=ns), metadata=md)),
    ]


def test_tenant_data_calls_in_own_namespace(td):
    d, a = td, kvs.bearer(TA)
    p = payload(7)
    kvs.put(d.stub, NS_A, b"k1", T, p, metadata=a)
    assert kvs.get(d.stub, NS_A, b"k1", metadata=a).data == p
    assert d.stub.Lookup(keys_req(NS_A, [b"k1", b"k2"]), metadata=a).prefix_blocks == 1
    assert list(d.stub.Exists(keys_req(NS_A, [b"k1", b"k2"]), metadata=a).present) == \
        [True, False]
    res = d.stub.PutMany(put_many_msgs(NS_A, [b"m0", b"m1"]), metadata=a, timeout=30).results
    assert [r.code for r in res] == [0, 0]
    msgs = list(d.stub.GetMany(pb.GetManyRequest(namespace=NS_A, keys=[b"m0", b"m1"]),
                               metadata=a, timeout=30))
    heads = [m.header for m in msgs if m.HasField("header")]
    assert [h.code for h in heads] == [0, 0]
    assert b"".join(m.data for m in msgs if not m.HasField("header")) == payload(0) + payload(1)
    assert d.stub.Delete(keys_req(NS_A, [b"k1", b"m0", b"m1"]), metadata=a).deleted == 3


def test_cross_tenant_data_calls_denied_alike(td):
    """A on B's existing namespace and on one that does not exist: the same code and the
    same details, call by call, so A learns nothing about B."""
    d, a, b = td, kvs.bearer(TA), kvs.bearer(TB)
    kvs.put(d.stub, NS_B, b"k", T, payload(3), metadata=b)  # B has the block A asks for
    for (name, call_b), (_, call_none) in zip(data_calls(d, NS_B, a), data_calls(d, NO_NS, a)):
        got_b, got_none = denied_details(call_b), denied_details(call_none)
        assert got_b == f"namespace '{NS_B}': not granted to this token", (name, got_b)
        assert got_none == f"namespace '{NO_NS}': not granted to this token", (name, got_none)
        assert got_b.replace(NS_B, "X") == got_none.replace(NO_NS, "X"), name
    # B's block is intact and B still reaches it.
    assert kvs.get(d.stub, NS_B, b"k", metadata=b).data == payload(3)
    assert list(d.stub.Exists(keys_req(NS_B), metadata=b).present) == [True]
    # And B cannot reach A's.
    denied_details(d.stub.Lookup, keys_req(NS_A), metadata=b)
    denied_details(d.stub.Exists, keys_req(NS_A), metadata=b)


def test_tenant_admin_calls(td):
    d, a, adm = td, kvs.bearer(TA), kvs.bearer(ADMIN)
    info = d.admin.GetNamespace(pb.NameRequest(name=NS_A), metadata=a)
    assert info.spec.name == NS_A and info.spec.layers == 2
    # Its second granted name: created on first use, as the vLLM connector does.
    info = d.admin.CreateNamespace(pb.CreateNamespaceRequest(spec=kvs.spec(NS_A2)), metadata=a)
    assert info.spec.name == NS_A2
    assert d.admin.GetNamespace(pb.NameRequest(name=NS_A2), metadata=a).spec.name == NS_A2
    assert d.admin.DropNamespace(pb.NameRequest(name=NS_A2), metadata=a).blocks_dropped == 0
    # Not granted: the same answer for B's namespace and for a free name.
    for name in (NS_B, NO_NS):
        want = f"namespace '{name}': not granted to this token"
        assert denied_details(d.admin.CreateNamespace,
                              pb.CreateNamespaceRequest(spec=kvs.spec(name)), metadata=a) == want
        assert denied_details(d.admin.GetNamespace, pb.NameRequest(name=name), metadata=a) == want
        assert denied_details(d.admin.DropNamespace, pb.NameRequest(name=name), metadata=a) == want
        assert denied_details(d.admin.Evict, pb.EvictRequest(
            namespace=name, to=pb.EvictRequest.TARGET_OUT), metadata=a) == want
    assert not any(n.spec.name == NO_NS for n in
                   d.admin.ListNamespaces(pb.ListNamespacesRequest(), metadata=adm).namespaces)
    # Calls about every tenant.
    for call, req in ((d.admin.ListNamespaces, pb.ListNamespacesRequest()),
                      (d.admin.Stats, pb.StatsRequest()), (d.admin.Verify, pb.VerifyRequest()),
                      (d.admin.Flush, pb.FlushRequest())):
        assert "tenant token may not call" in denied_details(call, req, metadata=a)
    assert "tenant" in denied_details(d.admin.Evict, pb.EvictRequest(
        all=True, to=pb.EvictRequest.TARGET_OUT), metadata=a)
    # Its own namespace: Evict is fine.
    d.admin.Evict(pb.EvictRequest(namespace=NS_A, to=pb.EvictRequest.TARGET_OUT), metadata=a)
    assert d.admin.Health(pb.HealthRequest(), metadata=a).status == kvs.SERVING


def test_tenant_namespaces_always_have_a_quota(td):
    """A tenant cannot opt out of host quotas: a namespace it creates without one gets the
    operator's cap (--tenant-host-quota, auto: a quarter of the 256M host tier), more than
    the cap is refused, less is kept; the admin's namespaces are as the admin made them."""
    d, a, adm = td, kvs.bearer(TA), kvs.bearer(ADMIN)
    cap = 64 << 20

    def create(quota):
        return d.admin.CreateNamespace(pb.CreateNamespaceRequest(
            spec=kvs.spec(NS_A2, host_quota_bytes=quota)), metadata=a).spec.host_quota_bytes

    try:
        assert create(0) == cap
        d.admin.DropNamespace(pb.NameRequest(name=NS_A2), metadata=a)
        kvs.expect_error(DENIED, create, cap + 1,
                         words=("host_quota_bytes", "--tenant-host-quota", str(cap)))
        assert create(8 << 20) == 8 << 20
    finally:
        with contextlib.suppress(grpc.RpcError):
            d.admin.DropNamespace(pb.NameRequest(name=NS_A2), metadata=adm)
    assert d.admin.GetNamespace(pb.NameRequest(name=NS_A), metadata=adm).spec.host_quota_bytes == 0


def test_tenant_namespaces_have_gpu_and_disk_quotas(daemon, files, tmp_path):
    """The same for the other tiers: with a disk tier, a tenant's namespace always has a disk
    quota (--tenant-disk-quota, auto: a quarter of the 64M --disk-capacity); the GPU tier's cap
    is auto a quarter of the GPU tier, none without one, and applies when set (8M here) even
    without. Asking none gets the cap, more is refused naming the field and the flag."""
    d = daemon(extra=["--admin-token-file", files["admin"], "--tenant-tokens", files["tenants"],
                      "--data-dir", tmp_path / "data", "--disk-capacity", "64M",
                      "--tenant-gpu-quota", "8M"], token=ADMIN)
    a, adm = kvs.bearer(TA), kvs.bearer(ADMIN)
    disk_cap, gpu_cap = 16 << 20, 8 << 20

    def create(**quotas):
        return d.admin.CreateNamespace(pb.CreateNamespaceRequest(
            spec=kvs.spec(NS_A2, **quotas)), metadata=a).spec

    def drop():
        d.admin.DropNamespace(pb.NameRequest(name=NS_A2), metadata=adm)

    s = create()
    assert (s.host_quota_bytes, s.gpu_quota_bytes, s.disk_quota_bytes) == \
        (64 << 20, gpu_cap, disk_cap)
    drop()
    for field, flag, cap in (("disk_quota_bytes", "--tenant-disk-quota", disk_cap),
                             ("gpu_quota_bytes", "--tenant-gpu-quota", gpu_cap)):
        kvs.expect_error(DENIED, create, **{field: cap + 1}, words=(field, flag, str(cap)))
    s = create(gpu_quota_bytes=1 << 20, disk_quota_bytes=2 << 20)
    assert (s.gpu_quota_bytes, s.disk_quota_bytes) == (1 << 20, 2 << 20)
    drop()
    # The admin's namespaces are as the admin made them.
    s = d.admin.CreateNamespace(pb.CreateNamespaceRequest(spec=kvs.spec(NS_A2)),
                                metadata=adm).spec
    assert (s.host_quota_bytes, s.gpu_quota_bytes, s.disk_quota_bytes) == (0, 0, 0)


@pytest.mark.parametrize("md", [None, kvs.bearer("wrong"), (("authorization", TA),),
                                kvs.bearer(TA + "x")],
                         ids=["none", "wrong", "no-bearer-prefix", "longer"])
def test_no_or_wrong_token_unauthenticated(td, md):
    d = td
    for name, call in data_calls(d, NS_A, md):
        e = kvs.rpc_error(call)
        assert e.code() == UNAUTH, (name, e.code(), e.details())
    for call, req in ((d.admin.GetNamespace, pb.NameRequest(name=NS_A)),
                      (d.admin.ListNamespaces, pb.ListNamespacesRequest()),
                      (d.admin.CreateNamespace, pb.CreateNamespaceRequest(spec=kvs.spec(NS_A)))):
        kvs.expect_error(UNAUTH, call, req, metadata=md)
    assert d.admin.Health(pb.HealthRequest(), metadata=md).status == kvs.SERVING


def test_admin_and_client_tokens_reach_everything(td):
    d, adm, c = td, kvs.bearer(ADMIN), kvs.bearer(CLIENT)
    for md in (adm, c):
        for ns in (NS_A, NS_B):
            kvs.put(d.stub, ns, b"shared", T, payload(5), metadata=md)
            assert kvs.get(d.stub, ns, b"shared", metadata=md).data == payload(5)
            assert d.stub.Delete(keys_req(ns, [b"shared"]), metadata=md).deleted == 1
    names = {n.spec.name for n in
             d.admin.ListNamespaces(pb.ListNamespacesRequest(), metadata=adm).namespaces}
    assert {NS_A, NS_B} <= names
    assert d.admin.Stats(pb.StatsRequest(), metadata=adm).version
    assert d.admin.GetNamespace(pb.NameRequest(name=NS_B), metadata=adm).spec.name == NS_B
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.admin.GetNamespace,
                     pb.NameRequest(name=NO_NS), metadata=adm)
    # The client token is no admin (an admin token is set).
    kvs.expect_error(DENIED, d.admin.ListNamespaces, pb.ListNamespacesRequest(), metadata=c)


def test_kvctl_token_file(td, files):
    d = td
    fa = write(files["dir"] / "a.token", TA + "\n")
    src = files["dir"] / "block.bin"
    src.write_bytes(payload(9))
    r = d.kvctl("--token-file", fa, "put", NS_A, "kvctl-key", str(src))
    assert r.returncode == 0, r.stderr
    r = d.kvctl("--token-file", fa, "lookup", NS_A, "kvctl-key")
    assert r.returncode == 0 and b"1" in r.stdout, (r.stdout, r.stderr)
    r = d.kvctl("--token-file", fa, "lookup", NS_B, "kvctl-key")
    assert r.returncode == 1 and b"not granted" in r.stderr, r.stderr
    # KVSTASH_TOKEN_FILE does the same; without a token the call is refused.
    env = dict(os.environ, KVSTASH_TOKEN_FILE=fa)
    r = subprocess.run([kvs.KVCTL, "--target", d.target, "exists", NS_A, "kvctl-key"],
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ)
    env.pop("KVSTASH_TOKEN", None)
    env.pop("KVSTASH_TOKEN_FILE", None)
    r = subprocess.run([kvs.KVCTL, "--target", d.target, "exists", NS_A, "kvctl-key"],
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 1 and b"bearer token" in r.stderr, r.stderr
    r = d.kvctl("--token-file", str(files["dir"] / "missing"), "exists", NS_A, "k")
    assert r.returncode == 2 and b"--token-file" in r.stderr, r.stderr


def test_python_token_file(td, files):
    fa = write(files["dir"] / "a-py.token", TA + "\n")
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((2, 2, T, 2, 16)).astype(np.float16) for _ in range(3)]
    keys = [b"py0", b"py1", b"py2"]
    with kvstash.Client(td.target, token_file=fa) as c:
        res = c.put_many(NS_A, zip(keys, data))
        assert all(isinstance(r, kvstash.PutResult) for r in res), res
        got = c.get_many(NS_A, keys)
        for g, want in zip(got, data):
            assert np.array_equal(np.asarray(g), want)
        with pytest.raises(kvstash.KvstashError) as e:
            c.get_many(NS_B, keys)
        assert e.value.status == "PERMISSION_DENIED" and "not granted" in str(e.value)
    with pytest.raises(ValueError):
        kvstash.Client(td.target, token="x", token_file=fa)


def test_sighup_rereads_tenant_file(daemon, tmp_path):
    adm_file = write(tmp_path / "admin", ADMIN)  # no trailing newline: as good
    tf = tenant_file(tmp_path / "tenants", [f"{NS_A} {TA}"])
    d = daemon(extra=["--admin-token-file", adm_file, "--tenant-tokens", tf], token=ADMIN)
    a, b, adm = kvs.bearer(TA), kvs.bearer(TB), kvs.bearer(ADMIN)
    for name in (NS_A, NS_B):
        d.admin.CreateNamespace(pb.CreateNamespaceRequest(spec=kvs.spec(name)), metadata=adm)
    kvs.put(d.stub, NS_A, b"k", T, payload(), metadata=a)
    kvs.expect_error(UNAUTH, d.stub.Lookup, keys_req(NS_B), metadata=b)
    # A revoked, B granted A's old namespace and its own; no config file is needed.
    tenant_file(tmp_path / "tenants", [f"{NS_B} {TB}", f"{NS_A} {TB}"])
    n = d.stderr_text().count("SIGHUP: tokens reloaded")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: d.stderr_text().count("SIGHUP: tokens reloaded") > n, "the reload")
    kvs.expect_error(UNAUTH, d.stub.Lookup, keys_req(NS_A), metadata=a)
    assert d.stub.Lookup(keys_req(NS_A), metadata=b).prefix_blocks == 1
    assert d.stub.Lookup(keys_req(NS_B), metadata=b).prefix_blocks == 0
    # A bad line refuses the reload whole, naming file:line: B keeps its grants.
    write(tmp_path / "tenants", f"{NS_B} {TB}\nbad/name {TA}\n")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: "config refused" in d.stderr_text(), "the refusal")
    assert f"{tmp_path / 'tenants'}:2:" in d.stderr_text()
    assert d.stub.Lookup(keys_req(NS_A), metadata=b).prefix_blocks == 1
    kvs.expect_error(UNAUTH, d.stub.Lookup, keys_req(NS_A), metadata=a)
    assert TA not in d.stderr_text() and TB not in d.stderr_text()  # tokens never logged


def start_fails(tmp_path, *extra, env=None):
    r = subprocess.run([kvs.KVSTASHD, "--listen", "127.0.0.1:0", *extra], capture_output=True,
                       timeout=30, env=env, cwd=tmp_path)
    assert r.returncode == 2, r
    return r.stderr.decode()


def test_token_files_refused_at_start(tmp_path):
    empty = write(tmp_path / "empty", "")
    err = start_fails(tmp_path, "--admin-token-file", empty)
    assert "admin_token_file" in err and empty in err and "empty" in err, err
    missing = str(tmp_path / "missing")
    err = start_fails(tmp_path, "--token-file", missing)
    assert "token_file" in err and missing in err, err
    ok_file = write(tmp_path / "tok", "t0k\n")
    err = start_fails(tmp_path, "--token-file", ok_file, "--token", "other")
    assert "--token-file: conflicts with token" in err, err
    env = dict(os.environ, KVSTASH_ADMIN_TOKEN="x")
    err = start_fails(tmp_path, "--admin-token-file", ok_file, env=env)
    assert "conflicts with admin_token (env KVSTASH_ADMIN_TOKEN)" in err, err
    bad = write(tmp_path / "tenants", f"{NS_A} {TA}\n{NS_B}\n")
    err = start_fails(tmp_path, "--tenant-tokens", bad)
    assert f"{bad}:2:" in err and "no token" in err and TA not in err, err


def test_token_file_readable_by_others_warns(daemon, tmp_path):
    f = write(tmp_path / "tok", ADMIN + "\n", mode=0o644)
    d = daemon(extra=["--admin-token-file", f], token=ADMIN)
    assert "admin_token_file" in d.stderr_text() and "readable by others" in d.stderr_text()
    assert d.admin.Stats(pb.StatsRequest(), metadata=kvs.bearer(ADMIN)).version
