"""Helpers for the kvstash integration tests: the wire (generated at test time from
proto/ with Debian's protoc and grpc_python_plugin), a running kvstashd, payloads, and
Put/Get through the Python stubs.

The generated client is an independent implementation of the wire, so the C server and
the C client cannot agree on a private mistake. Everything here is plain functions over
the stubs; conftest.py turns them into fixtures.
"""
import atexit
import contextlib
import hashlib
import importlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

KVSTASHD = os.environ.get("KVSTASHD", os.path.join(REPO, "build", "bin", "kvstashd"))
KVCTL = os.environ.get("KVCTL", os.path.join(REPO, "build", "bin", "kvctl"))
PROTO_DIR = os.environ.get("KVS_PROTO_DIR", os.path.join(REPO, "proto"))
# Extra kvstashd flags for every daemon (before each test's own), e.g. "--gpu on" to run
# the whole suite through the GPU engine on a GPU machine.
KVSTASHD_EXTRA = shlex.split(os.environ.get("KVSTASHD_EXTRA", ""))
# A directory holding kvstash/v1/kvstash_pb2{,_grpc}.py generated beforehand, for machines
# without protoc (the GPU machine); by default they are generated at test time.
PB_DIR = os.environ.get("KVS_PB_DIR")
PROTOC = "/usr/bin/protoc"
# A sanitizer build (ctest passes KVS_SANITIZE): its allocator keeps freed memory in
# quarantine and must be the first library loaded, so RSS checks and LD_PRELOAD shims do
# not apply.
SANITIZED = bool(os.environ.get("KVS_SANITIZE"))
GRPC_PLUGIN = "/usr/bin/grpc_python_plugin"

# Generous client-side limits so that the daemon's limits are the ones under test.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]

# ----------------------------------------------------------------------------- wire

pb = None       # kvstash.v1.kvstash_pb2
pb_grpc = None  # kvstash.v1.kvstash_pb2_grpc
_gen_dir = None


def load_proto():
    """Generates the messages and stubs into a temporary directory (once per process)
    and imports them. Returns (pb, pb_grpc)."""
    global pb, pb_grpc, _gen_dir
    if pb is not None:
        return pb, pb_grpc
    if PB_DIR:
        sys.path.insert(0, PB_DIR)
        pb = importlib.import_module("kvstash.v1.kvstash_pb2")
        pb_grpc = importlib.import_module("kvstash.v1.kvstash_pb2_grpc")
        return pb, pb_grpc
    src = os.path.join(PROTO_DIR, "kvstash", "v1", "kvstash.proto")
    if not os.path.exists(src):
        raise RuntimeError(f"proto not found: {src} (KVS_PROTO_DIR={PROTO_DIR})")
    _gen_dir = tempfile.mkdtemp(prefix="kvs-proto-")
    atexit.register(shutil.rmtree, _gen_dir, True)
    cmd = [PROTOC, f"-I{PROTO_DIR}", f"--python_out={_gen_dir}",
           f"--grpc_python_out={_gen_dir}",
           f"--plugin=protoc-gen-grpc_python={GRPC_PLUGIN}", src]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"protoc failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    # Regular packages (with __init__.py): a namespace package would lose to the client
    # package `kvstash` installed by the setup command, wherever that sits on sys.path.
    for d in ("kvstash", os.path.join("kvstash", "v1")):
        open(os.path.join(_gen_dir, d, "__init__.py"), "a").close()
    sys.path.insert(0, _gen_dir)
    pb = importlib.import_module("kvstash.v1.kvstash_pb2")
    pb_grpc = importlib.import_module("kvstash.v1.kvstash_pb2_grpc")
    # The modules must come from the directory just generated, not from anything
    # installed under the same package name.
    assert pb.__file__.startswith(_gen_dir), pb.__file__
    return pb, pb_grpc


load_proto()

FP16 = pb.DTYPE_FP16
BF16 = pb.DTYPE_BF16
RAW = pb.FORMAT_RAW
ENCODED = pb.FORMAT_ENCODED
TIER_NONE = pb.TIER_NONE
TIER_HOST = pb.TIER_HOST
SERVING = pb.HealthReply.SERVING
DRAINING = pb.HealthReply.DRAINING

# ----------------------------------------------------------------------------- layouts


def parse_encoded(b):
    """Independent reader of the encoded block format (gpu/codec/format.h, version 1): checks the
    header, the section table and the XXH3-64 over every byte (checksum field as zero) and
    returns (header dict, [(start, end) per section, (layer, K/V) order])."""
    import struct
    import xxhash
    assert len(b) >= 64 and b[:4] == b"KVS1", b[:4]
    (ver, dtype, flags, ns_id, kc, kb, vc, vb, L, H, D, _r, t, ks, vs, _r2, seed, total,
     csum) = struct.unpack_from("<HBBIBBBBHHHHIIIIQQQ", b, 4)
    assert ver == 1 and total == len(b)
    h = xxhash.xxh3_64()
    h.update(b[:56]); h.update(bytes(8)); h.update(b[64:])
    assert h.intdigest() == csum, "checksum"
    offs = struct.unpack_from("<%dI" % (2 * L + 1), b, 64)
    assert offs[0] == 64 + 4 * (2 * L + 1) and offs[-1] == total
    assert all(a <= c for a, c in zip(offs, offs[1:]))
    hdr = dict(dtype=dtype, flags=flags, ns_id=ns_id, k_codec=kc, k_bits=kb, v_codec=vc,
               v_bits=vb, layers=L, kv_heads=H, head_dim=D, tokens=t, k_state=ks,
               v_state=vs, seed=seed)
    return hdr, list(zip(offs[:-1], offs[1:]))


# What the host tier charges each block beyond its stored bytes (storage/store.h
# KVS_STORE_BLOCK_META; TierStats.block_meta_bytes says it too).
BLOCK_META = 512


def encoded_prefix_bytes(L):
    """Header + section table of an encoded block (gpu/codec/format.h)."""
    return 64 + 4 * (2 * L + 1)


def block_bytes(L, H, D, t, dtype=FP16):
    """Raw bytes of a block of t tokens: [L][2][t][H][D] of 2-byte elements."""
    return L * 2 * t * H * D * 2


def payload(L, H, D, t, dtype=FP16, seed=0):
    """Deterministic random block of t tokens (finite values: the daemon may reject NaN
    and Inf), as bytes of exactly block_bytes(L, H, D, t)."""
    rng = np.random.default_rng(seed)
    n = L * 2 * t * H * D
    x = rng.standard_normal(n, dtype=np.float32)
    if dtype == BF16:
        # bf16 = the top 16 bits of an fp32 (truncation keeps values finite).
        raw = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        raw = x.astype("<f2").tobytes()
    assert len(raw) == block_bytes(L, H, D, t, dtype)
    return raw


def seed_of(*parts):
    """A stable 64-bit seed from any printable parts (hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


_ns_counter = [0]
_ns_lock = threading.Lock()


def ns_name(prefix="ns"):
    with _ns_lock:
        _ns_counter[0] += 1
        return f"{prefix}-{os.getpid()}-{_ns_counter[0]}"


def spec(name=None, L=2, H=2, D=16, T=4, dtype=FP16, key_codec="none", value_codec="none",
         **kw):
    return pb.NamespaceSpec(name=name or ns_name(), layers=L, kv_heads=H, head_dim=D,
                            block_tokens=T, dtype=dtype, key_codec=key_codec,
                            value_codec=value_codec, **kw)


def make_ns(admin, name=None, L=2, H=2, D=16, T=4, dtype=FP16, metadata=None, **kw):
    """Creates a namespace; returns its NamespaceInfo."""
    s = spec(name, L, H, D, T, dtype, **kw)
    return admin.CreateNamespace(pb.CreateNamespaceRequest(spec=s), metadata=metadata,
                                 timeout=10)


class Ns:
    """A namespace's layout, to size and generate payloads for it."""

    def __init__(self, info):
        s = info.spec
        self.info = info
        self.name = s.name
        self.L, self.H, self.D, self.T, self.dtype = (s.layers, s.kv_heads, s.head_dim,
                                                      s.block_tokens, s.dtype)

    def bytes(self, t=None):
        return block_bytes(self.L, self.H, self.D, self.T if t is None else t, self.dtype)

    def layer_bytes(self, t=None):
        return self.bytes(t) // self.L

    def payload(self, t=None, seed=0):
        return payload(self.L, self.H, self.D, self.T if t is None else t, self.dtype, seed)


# ----------------------------------------------------------------------------- calls


def put_chunks(ns, key, tokens, data, dtype=FP16, chunk=1 << 20, payload_bytes=0):
    """PutChunk messages: the header, then data split by `chunk` (an int, or a list of
    sizes used in turn, cycling)."""
    yield pb.PutChunk(header=pb.PutHeader(namespace=ns, key=key, tokens=tokens, dtype=dtype,
                                          payload_bytes=payload_bytes))
    sizes = chunk if isinstance(chunk, (list, tuple)) else [chunk]
    i = pos = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield pb.PutChunk(data=data[pos:pos + n])
        pos += n
        i += 1


def put(stub, ns, key, tokens, data, dtype=FP16, chunk=1 << 20, payload_bytes=0,
        metadata=None, timeout=30):
    return stub.Put(put_chunks(ns, key, tokens, data, dtype, chunk, payload_bytes),
                    metadata=metadata, timeout=timeout)


class GetResult:
    def __init__(self, header, chunks):
        self.header = header
        self.chunks = chunks
        self.data = b"".join(c.data for c in chunks)


def check_get_chunks(header, chunks, packed=False):
    """Checks the streamed layout of a Get: data chunks in layout order, each within one
    layer, offsets contiguous from 0 in every layer of [layer_begin, layer_end), and the
    total equal to header.total_bytes. packed (GetMany, pack_layers): a chunk may instead
    hold several whole layers, starting at offset 0 of its `layer`."""
    b, e = header.layer_begin, header.layer_end
    assert e > b, f"header layer range [{b}, {e})"
    if header.format == ENCODED:  # one stream of bytes, all in "layer 0", contiguous
        off = 0
        for i, c in enumerate(chunks):
            assert not c.HasField("header") and len(c.data) > 0, f"chunk {i + 1}"
            assert c.layer == 0 and c.offset == off, f"chunk {i + 1}: {c.layer}/{c.offset}"
            off += len(c.data)
        assert off == header.total_bytes, f"{off} of {header.total_bytes} bytes"
        return
    n = e - b
    assert header.total_bytes % n == 0, f"total_bytes {header.total_bytes} over {n} layers"
    lb = header.total_bytes // n
    layer, off = b, 0
    for i, c in enumerate(chunks):
        assert not c.HasField("header"), f"chunk {i + 1} repeats the header"
        assert len(c.data) > 0, f"chunk {i + 1} is empty"
        if off == lb:  # previous layer complete: the next chunk starts the next one
            layer, off = layer + 1, 0
        if packed and off == 0 and len(c.data) > lb:
            assert len(c.data) % lb == 0, f"chunk {i + 1}: {len(c.data)} bytes, not whole layers"
            assert c.layer == layer and c.offset == 0, f"chunk {i + 1}: {c.layer}/{c.offset}"
            layer, off = layer + len(c.data) // lb - 1, lb
            assert layer < e, f"chunk {i + 1} runs past layer_end {e}"
            continue
        assert c.layer == layer and c.offset == off, (
            f"chunk {i + 1}: layer {c.layer} offset {c.offset}, expected layer {layer} "
            f"offset {off} (layer bytes {lb})")
        assert off + len(c.data) <= lb, (
            f"chunk {i + 1} crosses the end of layer {layer}: {off}+{len(c.data)} > {lb}")
        off += len(c.data)
    assert (layer, off) == (e - 1, lb), (
        f"stream ended at layer {layer} offset {off}, expected layer {e - 1} offset {lb}")


def get(stub, ns, key, layer_begin=0, layer_end=0, fmt=RAW, metadata=None, timeout=30,
        check=True):
    """Get through the stub; returns a GetResult after checking the chunk layout."""
    it = stub.Get(pb.GetRequest(namespace=ns, key=key, format=fmt, layer_begin=layer_begin,
                                layer_end=layer_end), metadata=metadata, timeout=timeout)
    msgs = list(it)
    assert msgs, "Get stream ended without a header"
    first = msgs[0]
    assert first.HasField("header"), f"first GetChunk has no header: {first}"
    assert len(first.data) == 0, "first GetChunk carries data"
    if check:
        check_get_chunks(first.header, msgs[1:])
    return GetResult(first.header, msgs[1:])


def rpc_error(fn, *args, **kw):
    """Calls fn and returns the grpc.RpcError it raised (fails if it did not)."""
    try:
        r = fn(*args, **kw)
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)) and \
                not hasattr(r, "DESCRIPTOR"):
            r = list(r)  # a server stream: the error comes while reading it
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"expected an error, got {r!r:.300}")


def expect_error(code, fn, *args, words=(), **kw):
    """Calls fn, expects grpc.RpcError with status `code` and every word of `words` in
    its details (case-insensitive); returns the error."""
    e = rpc_error(fn, *args, **kw)
    details = e.details() or ""
    assert e.code() == code, f"status {e.code()} ({details!r}), expected {code}"
    for w in ([words] if isinstance(words, str) else words):
        assert w.lower() in details.lower(), f"details {details!r} do not name {w!r}"
    return e


_client_modules = None


def rss_bytes(pid):
    """Resident memory of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(pred, what="condition", timeout=20):
    """Polls pred every 50 ms until it is true; AssertionError naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stuck_put(d, ns, release, timeout=30):
    """Starts a Put into ns (a kvs.Ns of 4-token blocks) that sends its header and 8 bytes
    and then waits for `release` (a threading.Event): a call that holds a drain open.
    Returns (channel, future)."""
    def chunks():
        yield pb.PutChunk(header=pb.PutHeader(namespace=ns.name, key=b"k", tokens=4,
                                              dtype=FP16))
        yield pb.PutChunk(data=b"\0" * 8)
        release.wait(timeout)

    ch, stub, _ = d.stubs()
    return ch, stub.Put.future(chunks(), timeout=timeout)


def pinned_bytes(d):
    """Pinned host memory the daemon has committed (a GPU engine's host pool; 0 without one):
    kept on purpose once committed, so memory tests count it apart from the heap."""
    return sum(t.pinned_bytes for t in d.stats().tiers if t.tier == TIER_HOST)


def key_vectors():
    """(block_tokens, token ids, key hex strings) of each line of tests/data/key-vectors.txt."""
    with open(os.path.join(REPO, "tests", "data", "key-vectors.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                bt, toks, keys = line.split()
                yield int(bt), [int(t) for t in toks.split(",")], keys.split(",")


class _LazyPackage:
    """The client package, imported on first use: a module whose daemon-side tests must also
    run in a sanitizer build uses this, so only its tests that touch the package skip."""

    def __getattr__(self, name):
        if name.startswith("__"):  # pytest's collection inspects module attributes
            raise AttributeError(name)
        return getattr(client_package(), name)


def lazy_client_package():
    return _LazyPackage()


def client_package():
    """The client package `kvstash` (client/python), imported once per session.

    The wire modules generated for these tests are the package kvstash.v1 (proto package
    kvstash.v1), imported at session start; the client package has the same top-level name.
    Both stay loaded: `pb` and `pb_grpc` keep their module objects, and from here on
    `kvstash` in sys.modules is the client package (its adapters included), imported once,
    so every test module sees the same classes (the vLLM test pickles connector metadata)."""
    if SANITIZED:
        # An ASan-instrumented libkvstash cannot be loaded into Python (the sanitizer's
        # runtime must be the first library of the process): the package's tests run in the
        # plain build; its C code runs under the sanitizers through kvctl and the C tests.
        import pytest
        pytest.skip("the Python package loads libkvstash: not in a sanitizer build",
                    allow_module_level=True)
    global _client_modules
    if _client_modules is None:
        sys.path.insert(0, os.path.join(REPO, "client", "python"))
        os.environ.setdefault("KVSTASH_LIB",
                              os.path.join(REPO, "build", "lib", "libkvstash.so.0"))
        for m in [m for m in sys.modules if m == "kvstash" or m.startswith("kvstash.")]:
            del sys.modules[m]
        for m in ("kvstash", "kvstash.integrations.vllm", "kvstash.integrations.sglang"):
            importlib.import_module(m)
        _client_modules = {m: mod for m, mod in sys.modules.items()
                           if m == "kvstash" or m.startswith("kvstash.")}
    sys.modules.update(_client_modules)
    return _client_modules["kvstash"]


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


# ----------------------------------------------------------------------------- kvctl

SANITIZER_REPORT = re.compile(r"runtime error: .*|ERROR: \w+Sanitizer: .*|"
                              r"WARNING: ThreadSanitizer: .*")


def run_kvctl(*args, timeout=120, input=None):
    """Runs $KVCTL ARGS and returns the CompletedProcess; a sanitizer report on its
    stderr (KVS_SANITIZE builds) fails at once, whatever the exit code."""
    r = subprocess.run([KVCTL] + [str(a) for a in args], capture_output=True,
                       timeout=timeout, input=input)
    m = SANITIZER_REPORT.search(r.stderr.decode("utf-8", "replace"))
    assert not m, f"sanitizer report from kvctl {args}: {r.stderr.decode('utf-8', 'replace')}"
    return r


# ----------------------------------------------------------------------------- filesystems


@contextlib.contextmanager
def small_filesystem(path, mib):
    """A filesystem of `mib` MiB mounted at path (created), for disk-full tests: a tmpfs
    where this process may mount one, else an ext4 image on a loop device. Yields the kind
    that ran ("tmpfs" or "loop"), or None when neither can be mounted here (the caller then
    falls back to a small --disk-capacity and says so)."""
    os.makedirs(path, exist_ok=True)
    kind = None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs",
                        str(path)], capture_output=True)
    if r.returncode == 0:
        kind = "tmpfs"
    else:
        img = f"{path}.img"
        try:
            with open(img, "wb") as f:
                f.truncate(mib << 20)
            if (subprocess.run(["mkfs.ext4", "-q", "-F", img], capture_output=True).returncode == 0
                    and subprocess.run(["mount", "-o", "loop", img, str(path)],
                                       capture_output=True).returncode == 0):
                kind = "loop"  # its lost+found is tolerated by the daemon
        except OSError:
            pass
    try:
        yield kind
    finally:
        if kind:  # lazily: a daemon still running (a failed test) must not keep it mounted
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        if kind != "tmpfs":
            with contextlib.suppress(OSError):
                os.unlink(f"{path}.img")


# ----------------------------------------------------------------------------- daemon

DEFAULT_TIMEOUT = 60  # seconds; a call made without a timeout gets this one


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, timeout):
        self.method, self.metadata, self.credentials = d.method, d.metadata, d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)
        self.timeout = timeout


class _DefaultTimeout(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Gives every call a deadline, so that a daemon that stops answering fails the test
    that hit it instead of hanging the whole run."""

    def _d(self, d):
        return d if d.timeout is not None else _Details(d, DEFAULT_TIMEOUT)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._d(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._d(d), req)

    def intercept_stream_unary(self, cont, d, reqs):
        return cont(self._d(d), reqs)

    def intercept_stream_stream(self, cont, d, reqs):
        return cont(self._d(d), reqs)


def _die_with_parent():
    """In the child before exec: SIGKILL it if the test process dies (e.g. killed by the
    ctest timeout), so no daemon outlives the run."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_SETPRIV = shutil.which("setpriv")


def spawn(argv, **kw):
    """subprocess.Popen(argv) whose process is SIGKILLed if the test process dies. With
    util-linux's setpriv the death signal is set by `setpriv --pdeathsig KILL` (it survives
    the exec), so Popen needs no preexec_fn and can use vfork: a plain fork() of this
    process runs grpc's fork handlers, which abort now and then while grpc's threads are
    busy (seen once in ~300 daemon starts of the crash test)."""
    if _SETPRIV:
        return subprocess.Popen([_SETPRIV, "--pdeathsig", "KILL", "--", *argv], **kw)
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)


_live = []  # daemons started and not yet stopped (their stderr goes into failure reports)


class Daemon:
    """A kvstashd on a free loopback port, with stubs over one channel.

    credentials: grpc.ChannelCredentials for every channel made here (a daemon with TLS:
    test_tls.py); None = plaintext. listen: HOST:PORT to listen on (port 0: a free one),
    e.g. another loopback address (test_sharding.py)."""

    def __init__(self, workdir, host_capacity="256M", extra=(), token=None,
                 start_timeout=20, credentials=None, env=None, listen="127.0.0.1:0"):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.port_file = os.path.join(workdir, "port")
        self.stderr_path = os.path.join(workdir, "kvstashd.stderr")
        self.token = token  # sent with Health while waiting for SERVING
        self.credentials = credentials
        # host_capacity None: no --host-capacity flag (a config file may set it).
        cap = [] if host_capacity is None else ["--host-capacity", str(host_capacity)]
        self.host = listen.rsplit(":", 1)[0]
        self.argv = [KVSTASHD, "--listen", listen, "--port-file", self.port_file,
                     *cap, *KVSTASHD_EXTRA, *map(str, extra)]
        if not os.access(KVSTASHD, os.X_OK):
            raise RuntimeError(f"kvstashd not built: {KVSTASHD}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port_file)
        self._err = open(self.stderr_path, "wb")
        # env: the whole environment of the daemon (None: this process's).
        self.proc = spawn(self.argv, stdin=subprocess.DEVNULL, stdout=self._err,
                          stderr=self._err, cwd=workdir, env=env)
        self.stopped = False
        _live.append(self)
        self.channel = None
        try:
            self.port = self._wait_port(start_timeout)
            self.target = f"{self.host}:{self.port}"
            self.channel = self.new_channel()
            self.stub = pb_grpc.KvStashStub(self.channel)
            self.admin = pb_grpc.KvAdminStub(self.channel)
            self._wait_serving(start_timeout)
        except BaseException:
            self.kill()
            raise

    def stderr_text(self, limit=20000):
        try:
            with open(self.stderr_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        text = data.decode("utf-8", "replace")
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def new_sanitizer_report(self):
        """The first sanitizer report written since the last call, or None."""
        text = self.stderr_text(limit=1 << 30)
        m = SANITIZER_REPORT.search(text, getattr(self, "_scanned", 0))
        self._scanned = len(text)
        return m.group(0) if m else None

    def _fail(self, what):
        return RuntimeError(f"{what}\nargv: {' '.join(self.argv)}\n--- kvstashd stderr ---\n"
                            f"{self.stderr_text()}")

    def _wait_port(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"kvstashd exited with {self.proc.returncode} at start")
            try:
                with open(self.port_file) as f:
                    s = f.read()
            except FileNotFoundError:
                s = ""
            s = s.strip()
            if s.isdigit():
                # A port file read mid-write could show a prefix of the number: take it
                # once two reads agree.
                if s == last and 0 < int(s) < 65536:
                    return int(s)
                last = s
            time.sleep(0.02)
        raise self._fail(f"no port in {self.port_file} after {timeout}s")

    def _wait_serving(self, timeout):
        deadline = time.monotonic() + timeout
        md = bearer(self.token) if self.token else None
        err = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"kvstashd exited with {self.proc.returncode} at start")
            try:
                r = self.admin.Health(pb.HealthRequest(), metadata=md, timeout=2)
                if r.status == SERVING:
                    return
                err = f"Health status {r.status}"
            except grpc.RpcError as e:
                err = f"Health: {e.code()} {e.details()}"
            time.sleep(0.05)
        raise self._fail(f"daemon not SERVING after {timeout}s: {err}")

    def new_channel(self, options=()):
        opts = CHANNEL_OPTIONS + list(options)
        ch = (grpc.secure_channel(self.target, self.credentials, options=opts)
              if self.credentials else grpc.insecure_channel(self.target, options=opts))
        return grpc.intercept_channel(ch, _DefaultTimeout())

    def stubs(self, options=()):
        """A fresh channel and its (KvStash, KvAdmin) stubs: (channel, stub, admin)."""
        ch = self.new_channel(options)
        return ch, pb_grpc.KvStashStub(ch), pb_grpc.KvAdminStub(ch)

    def kvctl(self, *args, timeout=120, input=None, target=True):
        """Runs $KVCTL --target <this daemon> ARGS; returns the CompletedProcess."""
        return run_kvctl(*((["--target", self.target] if target else []) + list(args)),
                         timeout=timeout, input=input)

    def health(self, timeout=5):
        return self.admin.Health(pb.HealthRequest(), timeout=timeout)

    def stats(self, metadata=None):
        return self.admin.Stats(pb.StatsRequest(), metadata=metadata, timeout=10)

    def has_gpu_engine(self):
        """True if this daemon encodes and decodes on a GPU (its start line says so)."""
        return "INFO GPU engine on " in self.stderr_text()

    def has_gpu_tier(self):
        """True if this daemon keeps blocks in a GPU tier (a GPU machine with one)."""
        return any(t.tier == pb.TIER_GPU and t.capacity_bytes > 0 for t in self.stats().tiers)

    def host_tier(self, metadata=None):
        for t in self.stats(metadata).tiers:
            if t.tier == TIER_HOST:
                return t
        raise AssertionError("Stats has no TIER_HOST entry")

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=20):
        """Waits for exit; returns the exit code or raises with stderr attached."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"kvstashd did not exit within {timeout}s of SIGTERM") from None

    def stop(self, timeout=20):
        """SIGTERM, wait, and check the exit code is 0. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.channel is not None:
                self.channel.close()
            self.terminate()
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise self._fail(f"kvstashd did not exit within {timeout}s of SIGTERM")
            if rc != 0:
                raise self._fail(f"kvstashd exited with {rc} (signal {-rc})" if rc < 0
                                 else f"kvstashd exited with {rc}")
            # In a sanitizer build (KVS_SANITIZE), a report that did not stop the daemon
            # still fails the test that provoked it.
            report = self.new_sanitizer_report()
            if report:
                raise self._fail(f"sanitizer report in kvstashd stderr: {report!r}")
        finally:
            self._close()

    def kill(self):
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.channel is not None:
            self.channel.close()
        self._close()

    def _close(self):
        if self in _live:
            _live.remove(self)
        self._err.close()


def live_daemons():
    return list(_live)
