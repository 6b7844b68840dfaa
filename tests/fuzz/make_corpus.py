"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/): valid inputs
the fuzzer mutates from. Run from the repository root with a built daemon:

    KVSTASHD=build/bin/kvstashd KVCTL=build/bin/kvctl /usr/bin/python3 tests/fuzz/make_corpus.py

fuzz_block gets real encoded blocks of each of its namespaces (ENCODED Gets from a daemon),
fuzz_wire serialized requests of each message type it decodes, fuzz_config the documented
config file and a tenant token file. Each file is the target's selector byte + the bytes."""
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import kvs  # noqa: E402
from kvs import pb  # noqa: E402

OUT = os.path.join(HERE, "corpus")
# fuzz_block.c's namespaces, in its order: (key codec, value codec, dtype).
SPACES = [("none", "none", kvs.FP16), ("fp8", "fp8", kvs.FP16), ("kivi-2", "kivi-2", kvs.FP16),
          ("kivi-4", "kivi-4", kvs.BF16), ("polarquant", "kivi-2", kvs.FP16),
          ("rotatekv-2", "rotatekv-4", kvs.FP16), ("squat-2", "kivi-2", kvs.FP16),
          ("rotatekv-3", "squat-4", kvs.BF16)]
# fuzz_wire.c's message types, in its order.
WIRE = ["CreateNamespaceRequest", "KeysRequest", "GetRequest", "GetManyRequest", "PutChunk",
        "EvictRequest", "AddQueriesRequest", "CodecStateRequest"]


def write(target, name, selector, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes([selector]) + data)


def blocks():
    with tempfile.TemporaryDirectory() as tmp:
        d = kvs.Daemon(tmp, host_capacity="64M")
        try:
            for i, (k, v, dt) in enumerate(SPACES):
                name = f"c{i}"
                kvs.make_ns(d.admin, name, L=2, H=2, D=64, T=16, dtype=dt, key_codec=k,
                            value_codec=v)
                for t in (16, 5):  # a full and a partial block
                    ns = kvs.Ns(d.admin.ListNamespaces(pb.ListNamespacesRequest()).namespaces[i])
                    data = ns.payload(t, seed=i * 7 + t)
                    kvs.put(d.stub, name, b"k%d" % t, t, data, dtype=dt)
                    enc = kvs.get(d.stub, name, b"k%d" % t, fmt=kvs.ENCODED).data
                    write("fuzz_block", f"{k}-{v}-{t}", i, enc)
                    write("fuzz_block", f"{k}-{v}-{t}-sealed", i | 0x80, enc)  # resealed
        finally:
            d.stop()


def wire():
    layout = pb.PagedLayout(page_tokens=16, k_base=[0, 65536, 131072, 196608],
                            v_base=[32768, 98304, 163840, 229376], page_stride=4096,
                            token_stride=256, head_stride=128)
    msgs = {
        "CreateNamespaceRequest": pb.CreateNamespaceRequest(spec=kvs.spec(
            "fuzz", L=4, H=2, D=64, T=16, key_codec="kivi-2", value_codec="polarquant",
            durable=True, seed=7, host_quota_bytes=1 << 20, gpu_quota_bytes=1 << 20,
            disk_quota_bytes=2 << 20)),
        "KeysRequest": pb.KeysRequest(namespace="fuzz", keys=[b"a", b"b" * 64, b"\x00" * 16]),
        "GetRequest": pb.GetRequest(namespace="fuzz", key=b"k", layer_begin=1, layer_end=3),
        "GetManyRequest": pb.GetManyRequest(namespace="fuzz", keys=[b"a", b"b"], prefix=True,
                                            layer_begin=0, layer_end=2, region=b"r" * 16,
                                            layout=layout, pages=[3, 9]),
        "PutChunk": pb.PutChunk(header=pb.PutHeader(namespace="fuzz", key=b"k", tokens=16,
                                                    dtype=kvs.FP16, region=b"r" * 16,
                                                    layout=layout)),
        "EvictRequest": pb.EvictRequest(namespace="fuzz", keys=[b"a"]),
        "AddQueriesRequest": pb.AddQueriesRequest(namespace="fuzz", query_heads=4, tokens=2,
                                                  queries=bytes(4 * 2 * 4 * 64 * 2)),
        "CodecStateRequest": pb.CodecStateRequest(namespace="fuzz", version=1),
    }
    for i, t in enumerate(WIRE):
        write("fuzz_wire", t, i, msgs[t].SerializeToString())


def config():
    with open(os.path.join(HERE, "..", "..", "deploy", "kvstashd.yaml"), "rb") as f:
        write("fuzz_config", "kvstashd.yaml", 0, f.read())
    write("fuzz_config", "small.yaml", 0,
          b"host_capacity: 8G\neviction: s3fifo\nlog_level: debug\nthreads: auto\n")
    write("fuzz_config", "tenants", 1,
          b"# namespace token\nteam-a s3cr3t-a\nteam-b s3cr3t-b\nteam-a-2 s3cr3t-a\n")


if __name__ == "__main__":
    np.random.seed(0)
    blocks()
    wire()
    config()
    for t in sorted(os.listdir(OUT)):
        print(t, len(os.listdir(os.path.join(OUT, t))), "inputs")
