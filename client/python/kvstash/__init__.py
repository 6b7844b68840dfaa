"""kvstash: the Python client of kvstashd, a KV-cache offload store for LLM inference.

A ctypes binding over libkvstash (no compiled extension): everything the C client does, on
numpy arrays and torch tensors (CPU or CUDA), with batched calls that use shared memory with
a daemon on the same host (CUDA IPC for CUDA tensors when its GPU engine runs on their GPU),
and decode on this process's GPU into CUDA tensors (libkvstash_cuda) where that moves fewer
bytes. Client.last_path says which path ran.

    import numpy as np, kvstash
    with kvstash.Client("127.0.0.1:50051") as c:
        c.create_namespace("demo", layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        keys = kvstash.block_keys(list(range(48)), 16)          # 3 chained block keys
        blocks = [np.random.randn(2, 2, 16, 2, 64).astype(np.float16) for _ in keys]
        c.put_many("demo", zip(keys, blocks))
        assert all((a == b).all() for a, b in zip(c.get_prefix("demo", keys), blocks))

The library is found at $KVSTASH_LIB, beside the package, in a source tree's build/lib, or by
the system's search path.
"""
from .client import Client, KvstashError, Namespace, PutResult, block_keys
from .paged import PageLayout

__all__ = ["Client", "KvstashError", "Namespace", "PageLayout", "PutResult", "block_keys"]
__version__ = "0.1.0"
