"""TLS and mutual TLS on the gRPC listener (issue 14 item 2, README "TLS"). A CA, a server
certificate (SAN localhost and 127.0.0.1), a client certificate, and a second CA with its
own client certificate are made here with the openssl CLI. A daemon with tls_cert/tls_key
serves grpcio, kvctl and the Python package over TLS and refuses plaintext clients and
clients that trust another CA; with tls_client_ca it refuses clients without a
certificate from that CA; with tenant tokens too, a tenant reaches its namespace with TLS
and its token, and no other. Bad TLS settings stop the daemon naming the key and path."""
import os
import subprocess

import grpc
import numpy as np
import pytest

import kvs
from kvs import pb

kvstash = kvs.lazy_client_package()  # Python-package tests skip in a sanitizer build

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ADMIN, TENANT = "tls-admin-secret", "tls-tenant-secret"
NS_T, NS_OTHER = "tls-tenant", "tls-other"


def openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=kvstash test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_leaf(d, name, ca, cn, ext):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\n" + ext + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d)
    os.chmod(os.path.join(d, f"{name}.key"), 0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(d, "server", "ca", "localhost",
              "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    make_leaf(d, "client", "ca", "kvstash-test-client", "extendedKeyUsage=clientAuth")
    make_leaf(d, "other-client", "other-ca", "kvstash-other-client",
              "extendedKeyUsage=clientAuth")
    p = {k: os.path.join(d, k) for k in ("ca.pem", "other-ca.pem", "server.pem", "server.key",
                                         "client.pem", "client.key", "other-client.pem",
                                         "other-client.key")}
    p["dir"] = d
    return p


def read(path):
    with open(path, "rb") as f:
        return f.read()


def creds(pki, ca="ca.pem", client=None):
    """grpcio credentials trusting `ca`, presenting `client` ("client", "other-client")."""
    kw = {}
    if client:
        kw = dict(private_key=read(pki[f"{client}.key"]),
                  certificate_chain=read(pki[f"{client}.pem"]))
    return grpc.ssl_channel_credentials(root_certificates=read(pki[ca]), **kw)


def tls_flags(pki, mutual=False):
    f = ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]]
    return f + (["--tls-client-ca", pki["ca.pem"]] if mutual else [])


def health_error(target, credentials=None):
    """The status of a Health call over a fresh channel (plaintext if credentials is None)."""
    ch = (grpc.secure_channel(target, credentials) if credentials
          else grpc.insecure_channel(target))
    try:
        stub = kvs.pb_grpc.KvAdminStub(ch)
        return kvs.rpc_error(stub.Health, pb.HealthRequest(), timeout=5)
    finally:
        ch.close()


def round_trip(d, stub=None, admin=None, metadata=None, ns=None):
    """CreateNamespace, Put and Get through the grpcio stubs; returns the namespace name."""
    stub, admin = stub or d.stub, admin or d.admin
    info = kvs.make_ns(admin, name=ns, metadata=metadata)
    n = kvs.Ns(info)
    data = n.payload(seed=7)
    kvs.put(stub, n.name, b"tls-key", n.T, data, metadata=metadata)
    got = kvs.get(stub, n.name, b"tls-key", metadata=metadata)
    assert got.data == data
    return n.name


def blocks(n, t=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 2, t, 2, 64)).astype(np.float16) for _ in range(n)]


def python_round_trip(client, name, create=True):
    if create:
        client.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
    keys = kvstash.block_keys(list(range(16 * 3)), 16)
    data = blocks(3)
    client.put_many(name, zip(keys, data))
    got = client.get_many(name, keys)
    assert all(g is not None and (g == x).all() for g, x in zip(got, data))


def kvctl_round_trip(d, tmp_path, *flags, ns=None, create=True):
    """status (unless a tenant: Stats is not theirs), ns create, put, get through kvctl."""
    ns = ns or kvs.ns_name("tls-kvctl")
    if create:
        r = d.kvctl(*flags, "ns", "create", ns, "--layers", "2", "--kv-heads", "2",
                    "--head-dim", "16", "--block-tokens", "4")
        assert r.returncode == 0, r.stderr.decode()
    src = tmp_path / f"{ns}.bin"
    src.write_bytes(kvs.payload(2, 2, 16, 4, seed=3))
    r = d.kvctl(*flags, "put", ns, "kv-key", str(src))
    assert r.returncode == 0, r.stderr.decode()
    out = tmp_path / f"{ns}.out"
    r = d.kvctl(*flags, "get", ns, "kv-key", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == src.read_bytes()
    return ns


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_daemon(module_daemon, pki):
    return module_daemon(extra=tls_flags(pki), credentials=creds(pki))


def test_grpcio_round_trip(tls_daemon):
    round_trip(tls_daemon)
    assert ", TLS" in tls_daemon.stderr_text()


def test_plaintext_client_refused(tls_daemon):
    e = health_error(tls_daemon.target)
    assert e.code() == UNAVAILABLE, e


def test_client_trusting_another_ca_refused(tls_daemon, pki):
    e = health_error(tls_daemon.target, creds(pki, ca="other-ca.pem"))
    assert e.code() == UNAVAILABLE, e


def test_kvctl(tls_daemon, pki, tmp_path):
    r = tls_daemon.kvctl("--tls-ca", pki["ca.pem"], "status")
    assert r.returncode == 0, r.stderr.decode()
    kvctl_round_trip(tls_daemon, tmp_path, "--tls-ca", pki["ca.pem"])
    # The name checked in the certificate: "localhost" is in it, another name is not.
    r = tls_daemon.kvctl("--tls-ca", pki["ca.pem"], "--tls-server-name", "localhost", "status")
    assert r.returncode == 0, r.stderr.decode()
    r = tls_daemon.kvctl("--tls-ca", pki["ca.pem"], "--tls-server-name", "wrong.example",
                         "--timeout-ms", "3000", "status")
    assert r.returncode == 1, r
    # Without TLS the call fails; a CA path that does not exist is named.
    r = tls_daemon.kvctl("--timeout-ms", "3000", "status")
    assert r.returncode == 1, r
    r = tls_daemon.kvctl("--tls-ca", pki["other-ca.pem"], "--timeout-ms", "3000", "status")
    assert r.returncode == 1, r
    missing = os.path.join(pki["dir"], "nope.pem")
    r = tls_daemon.kvctl("--tls-ca", missing, "status")
    assert r.returncode != 0 and b"tls_ca" in r.stderr and missing.encode() in r.stderr, r


def test_kvctl_env(tls_daemon, pki):
    env = dict(os.environ, KVSTASH_TLS_CA=pki["ca.pem"], KVSTASH_TARGET=tls_daemon.target)
    r = subprocess.run([kvs.KVCTL, "status"], env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()


def test_python_package(tls_daemon, pki):
    with kvstash.Client(tls_daemon.target, tls_ca=pki["ca.pem"]) as c:
        python_round_trip(c, kvs.ns_name("tls-py"))
        assert c.last_path == "grpc"
    with kvstash.Client(tls_daemon.target, tls_ca=pki["ca.pem"],
                        tls_server_name="localhost") as c:
        c.namespaces()
    with kvstash.Client(tls_daemon.target, timeout_ms=3000) as c:
        with pytest.raises(kvstash.KvstashError, match="UNAVAILABLE"):
            c.namespaces()
    with kvstash.Client(tls_daemon.target, tls_ca=pki["ca.pem"], tls_server_name="wrong.example",
                        timeout_ms=3000) as c:
        with pytest.raises(kvstash.KvstashError, match="UNAVAILABLE"):
            c.namespaces()
    with pytest.raises(kvstash.KvstashError, match="tls_ca: .*holds no PEM"):
        kvstash.Client(tls_daemon.target, tls_ca=pki["server.key"])
    with pytest.raises(kvstash.KvstashError, match="tls_cert: set without tls_key"):
        kvstash.Client(tls_daemon.target, tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"])


# ----------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def mtls_daemon(module_daemon, pki):
    return module_daemon(extra=tls_flags(pki, mutual=True),
                         credentials=creds(pki, client="client"))


def test_mtls_grpcio(mtls_daemon, pki):
    round_trip(mtls_daemon)
    assert "mutual TLS" in mtls_daemon.stderr_text()
    for bad in (creds(pki), creds(pki, client="other-client")):  # none, another CA's
        e = health_error(mtls_daemon.target, bad)
        assert e.code() == UNAVAILABLE, e


def test_mtls_kvctl(mtls_daemon, pki, tmp_path):
    base = ["--tls-ca", pki["ca.pem"]]
    r = mtls_daemon.kvctl(*base, "--timeout-ms", "3000", "status")
    assert r.returncode == 1, r
    r = mtls_daemon.kvctl(*base, "--tls-cert", pki["other-client.pem"], "--tls-key",
                          pki["other-client.key"], "--timeout-ms", "3000", "status")
    assert r.returncode == 1, r
    mine = base + ["--tls-cert", pki["client.pem"], "--tls-key", pki["client.key"]]
    r = mtls_daemon.kvctl(*mine, "status")
    assert r.returncode == 0, r.stderr.decode()
    kvctl_round_trip(mtls_daemon, tmp_path, *mine)
    env = dict(os.environ, KVSTASH_TLS_CA=pki["ca.pem"], KVSTASH_TLS_CERT=pki["client.pem"],
               KVSTASH_TLS_KEY=pki["client.key"])
    r = subprocess.run([kvs.KVCTL, "--target", mtls_daemon.target, "status"], env=env,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()


def test_mtls_python(mtls_daemon, pki):
    with kvstash.Client(mtls_daemon.target, tls_ca=pki["ca.pem"], timeout_ms=3000) as c:
        with pytest.raises(kvstash.KvstashError, match="UNAVAILABLE"):
            c.namespaces()
    with kvstash.Client(mtls_daemon.target, tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"],
                        tls_key=pki["client.key"]) as c:
        python_round_trip(c, kvs.ns_name("mtls-py"))


# ----------------------------------------------------------------------------- with tenants


def test_tls_with_tenant_tokens(module_daemon, pki, tmp_path):
    d = tmp_path
    (d / "admin.token").write_text(ADMIN + "\n")
    (d / "tenants").write_text(f"{NS_T} {TENANT}\n")
    (d / "tenant.token").write_text(TENANT + "\n")
    for f in ("admin.token", "tenants", "tenant.token"):
        os.chmod(d / f, 0o600)
    td = module_daemon(extra=tls_flags(pki) + ["--admin-token-file", str(d / "admin.token"),
                                               "--tenant-tokens", str(d / "tenants")],
                       credentials=creds(pki), token=ADMIN)
    adm = kvs.bearer(ADMIN)
    td.admin.CreateNamespace(pb.CreateNamespaceRequest(spec=kvs.spec(NS_OTHER)), metadata=adm)
    tls = ["--tls-ca", pki["ca.pem"]]
    tok = ["--token-file", str(d / "tenant.token")]
    # kvctl: the tenant's namespace with TLS and its token; not without the token, not
    # another namespace, not without TLS.
    kvctl_round_trip(td, tmp_path, *tls, *tok, ns=NS_T)
    r = td.kvctl(*tls, "lookup", NS_T, "kv-key")
    assert r.returncode == 1 and b"bearer token" in r.stderr, r
    r = td.kvctl(*tls, *tok, "lookup", NS_OTHER, "kv-key")
    assert r.returncode == 1 and b"not granted" in r.stderr, r
    r = td.kvctl(*tok, "--timeout-ms", "3000", "lookup", NS_T, "kv-key")
    assert r.returncode == 1 and b"UNAVAILABLE" in r.stderr, r
    # The admin token over TLS too.
    r = td.kvctl(*tls, "--token", ADMIN, "ns", "list")
    assert r.returncode == 0 and NS_OTHER.encode() in r.stdout, r
    # The Python package: its own namespace (created on first use), and no other.
    with kvstash.Client(td.target, tls_ca=pki["ca.pem"],
                        token_file=str(d / "tenant.token")) as c:
        c.drop_namespace(NS_T)
        python_round_trip(c, NS_T)
        with pytest.raises(kvstash.KvstashError, match="not granted"):
            c.get_many(NS_OTHER, [b"k" * 8])
    # grpcio: the tenant's token over the TLS channel.
    ch, stub, admin = td.stubs()
    try:
        e = kvs.expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.Lookup,
                             pb.KeysRequest(namespace=NS_OTHER, keys=[b"k"]),
                             metadata=kvs.bearer(TENANT))
        r = stub.Lookup(pb.KeysRequest(namespace=NS_T, keys=[b"k"]), metadata=kvs.bearer(TENANT))
        assert r is not None
    finally:
        ch.close()


# ----------------------------------------------------------------------------- bad config


def start_fails(*flags, timeout=30):
    """Runs kvstashd with flags; it must exit != 0 at once. Returns its stderr."""
    r = subprocess.run([kvs.KVSTASHD, "--listen", "127.0.0.1:0", *flags],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode != 0, f"kvstashd started with {flags}: {r.stderr}"
    return r.stderr


def test_bad_tls_config(pki, tmp_path):
    missing = str(tmp_path / "missing.pem")
    err = start_fails("--tls-cert", missing, "--tls-key", pki["server.key"])
    assert "tls_cert" in err and missing in err and "No such file" in err, err
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    err = start_fails("--tls-cert", str(garbage), "--tls-key", pki["server.key"])
    assert "tls_cert" in err and str(garbage) in err and "no PEM certificate" in err, err
    err = start_fails("--tls-cert", pki["server.pem"], "--tls-key", str(garbage))
    assert "tls_key" in err and str(garbage) in err, err
    # A key that is not the certificate's, a damaged certificate block.
    err = start_fails("--tls-cert", pki["server.pem"], "--tls-key", pki["client.key"])
    assert "tls_key" in err and "not the key of the certificate" in err, err
    damaged = tmp_path / "damaged.pem"
    text = read(pki["server.pem"]).decode().splitlines()
    damaged.write_text("\n".join(text[:3] + ["!!!!"] + text[4:]) + "\n")
    err = start_fails("--tls-cert", str(damaged), "--tls-key", pki["server.key"])
    assert "tls_cert" in err and str(damaged) in err and "damaged" in err, err
    # A key protected by a passphrase would prompt on the terminal: refused instead.
    enc = str(tmp_path / "enc.key")
    openssl("pkey", "-in", pki["server.key"], "-aes256", "-passout", "pass:secret", "-out", enc,
            cwd=str(tmp_path))
    err = start_fails("--tls-cert", pki["server.pem"], "--tls-key", enc)
    assert "tls_key" in err and enc in err and "passphrase" in err, err
    err = start_fails("--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                      "--tls-client-ca", str(garbage))
    assert "tls_client_ca" in err and str(garbage) in err, err
    # Incomplete combinations, and TLS on a Unix socket.
    err = start_fails("--tls-cert", pki["server.pem"])
    assert "--tls-cert: needs tls_key" in err, err
    err = start_fails("--tls-key", pki["server.key"])
    assert "--tls-key: needs tls_cert" in err, err
    err = start_fails("--tls-client-ca", pki["ca.pem"])
    assert "--tls-client-ca" in err, err
    err = start_fails("--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                      "--listen", f"unix:{tmp_path}/kvs.sock")
    assert "--tls-cert" in err and "TCP" in err, err
    # In a config file, the error names the file, the line and the key.
    conf = tmp_path / "kvstashd.yaml"
    conf.write_text(f'tls_cert: "{pki["server.pem"]}"\n')
    err = start_fails("--config", str(conf))
    assert f"{conf}:1: tls_cert: needs tls_key" in err, err


def test_print_config_shows_tls_keys(pki):
    r = subprocess.run([kvs.KVSTASHD, "--tls-cert", pki["server.pem"], "--tls-key",
                        pki["server.key"], "--print-config"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert f'tls_cert: "{pki["server.pem"]}"  # flag --tls-cert' in r.stdout, r.stdout
    assert 'tls_client_ca: ""  # default' in r.stdout, r.stdout


def test_sighup_reloads_the_certificate(daemon, pki, tmp_path):
    # A certificate is renewed in place (same paths, new files) and the daemon is sent
    # SIGHUP: new connections get the new certificate; no restart, no call refused.
    import shutil
    import signal
    cert, key = str(tmp_path / "tls.pem"), str(tmp_path / "tls.key")
    shutil.copy(pki["server.pem"], cert)
    shutil.copy(pki["server.key"], key)
    os.chmod(key, 0o600)
    d = daemon(extra=["--tls-cert", cert, "--tls-key", key], credentials=creds(pki))
    round_trip(d)
    make_leaf(pki["dir"], "renewed", "other-ca", "localhost",
              "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    shutil.copy(os.path.join(pki["dir"], "renewed.pem"), cert)
    shutil.copy(os.path.join(pki["dir"], "renewed.key"), key)
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: "SIGHUP: TLS" in d.stderr_text(), "the reload's log")
    ch = grpc.secure_channel(d.target, creds(pki, ca="other-ca.pem"))
    try:  # trusting only the new certificate's CA: served
        kvs.pb_grpc.KvAdminStub(ch).Health(pb.HealthRequest(), timeout=10)
    finally:
        ch.close()
    e = health_error(d.target, creds(pki, ca="ca.pem"))  # the old one is no longer served
    assert e.code() == UNAVAILABLE, e
    # A broken file is refused whole: the renewed certificate stays in use.
    with open(key, "w") as f:
        f.write("not a key\n")
    d.proc.send_signal(signal.SIGHUP)
    kvs.wait_for(lambda: "SIGHUP: TLS files refused" in d.stderr_text(), "the refusal's log")
    ch = grpc.secure_channel(d.target, creds(pki, ca="other-ca.pem"))
    try:
        kvs.pb_grpc.KvAdminStub(ch).Health(pb.HealthRequest(), timeout=10)
    finally:
        ch.close()
    assert d.proc.poll() is None
