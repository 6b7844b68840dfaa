"""ctypes declarations of libkvstash (client/include/kvstash.h): the structs and functions the
package calls, mirrored field for field. Internal: use kvstash.Client.

The library is found, in order, at $KVSTASH_LIB, next to this package (an installed copy),
in the source tree's build directory (build/lib, for a checkout), then where the dynamic
linker finds libkvstash.so.0 (LD_LIBRARY_PATH, the ld.so cache after `cmake --install` and
ldconfig), then by ctypes.util.find_library."""
import ctypes
import ctypes.util
import os

c_u8p = ctypes.POINTER(ctypes.c_uint8)

ERR_MSG_LEN = 256
NAME_MAX = 64
CODEC_NAME_MAX = 31
KEY_MAX = 64


class Err(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * ERR_MSG_LEN)]


class ClientOpts(ctypes.Structure):
    _fields_ = [("target", ctypes.c_char_p), ("token", ctypes.c_char_p),
                ("timeout_ms", ctypes.c_int64), ("max_message", ctypes.c_size_t),
                ("chunk_bytes", ctypes.c_size_t),
                # TLS (kvstash.h): PEM file paths and the name override, in its order.
                ("tls_ca", ctypes.c_char_p), ("tls_cert", ctypes.c_char_p),
                ("tls_key", ctypes.c_char_p), ("tls_server_name", ctypes.c_char_p),
                ("connections", ctypes.c_uint)]


class NsSpec(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * (NAME_MAX + 1)), ("layers", ctypes.c_uint32),
                ("kv_heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("block_tokens", ctypes.c_uint32), ("dtype", ctypes.c_int),
                ("key_codec", ctypes.c_char * (CODEC_NAME_MAX + 1)),
                ("value_codec", ctypes.c_char * (CODEC_NAME_MAX + 1)),
                ("keys_pre_rope", ctypes.c_bool), ("durable", ctypes.c_bool),
                ("seed", ctypes.c_uint64), ("host_quota", ctypes.c_uint64),
                # Fidelity (README "Namespace options").
                ("error_sample_set", ctypes.c_bool), ("error_sample", ctypes.c_double),
                ("max_rel_error", ctypes.c_double),
                ("fallback_codec", ctypes.c_char * (CODEC_NAME_MAX + 1)),
                # Quotas of the GPU and disk tiers (last in kvs_ns_spec).
                ("gpu_quota", ctypes.c_uint64), ("disk_quota", ctypes.c_uint64),
                # Precision demotion: the host and disk tiers' codecs ("": none).
                ("host_codec", ctypes.c_char * (CODEC_NAME_MAX + 1)),
                ("disk_codec", ctypes.c_char * (CODEC_NAME_MAX + 1))]


class ErrorStats(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("mean", ctypes.c_double), ("max", ctypes.c_double)]


class NsFidelity(ctypes.Structure):
    _fields_ = [("error_sample", ctypes.c_double), ("keys", ErrorStats), ("values", ErrorStats),
                ("logits", ErrorStats), ("checked", ctypes.c_uint64),
                ("fallback_blocks", ctypes.c_uint64), ("fallback_keys", ctypes.c_uint64),
                ("fallback_values", ctypes.c_uint64)]


class NsInfo(ctypes.Structure):
    _fields_ = [("spec", NsSpec), ("id", ctypes.c_uint32), ("blocks", ctypes.c_uint64),
                ("stored_bytes", ctypes.c_uint64), ("raw_bytes", ctypes.c_uint64),
                ("block_bytes", ctypes.c_uint64), ("fidelity", NsFidelity)]


class PutResult(ctypes.Structure):
    _fields_ = [("tier", ctypes.c_int), ("encoded_bytes", ctypes.c_uint64),
                ("raw_bytes", ctypes.c_uint64), ("replaced", ctypes.c_bool),
                ("fallback", ctypes.c_bool)]


class GetResult(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint32), ("dtype", ctypes.c_int),
                ("layer_begin", ctypes.c_uint32), ("layer_end", ctypes.c_uint32),
                ("bytes", ctypes.c_uint64), ("format", ctypes.c_int), ("tier", ctypes.c_int),
                ("fallback", ctypes.c_bool),
                ("key_codec", ctypes.c_char * (CODEC_NAME_MAX + 1)),
                ("value_codec", ctypes.c_char * (CODEC_NAME_MAX + 1))]


class CudaBlock(ctypes.Structure):
    """kvs_cuda_block (kvstash_cuda.h): one block of kvs_decode_blocks_cuda."""
    _fields_ = [("enc", ctypes.c_void_p), ("len", ctypes.c_size_t),
                ("raw_dev", ctypes.c_void_p), ("cap", ctypes.c_size_t), ("rc", ctypes.c_int),
                ("msg", ctypes.c_char * 160), ("res", GetResult)]


class PutItem(ctypes.Structure):
    _fields_ = [("key", ctypes.c_void_p), ("key_len", ctypes.c_size_t),
                ("tokens", ctypes.c_uint32), ("data", ctypes.c_void_p),
                ("len", ctypes.c_size_t), ("region", ctypes.c_void_p),
                ("offset", ctypes.c_uint64), ("rc", ctypes.c_int), ("msg", ctypes.c_char * 160),
                ("res", PutResult), ("pages", ctypes.POINTER(ctypes.c_uint32)),
                ("n_pages", ctypes.c_size_t)]


class PageLayout(ctypes.Structure):  # kvs_page_layout
    _fields_ = [("page_tokens", ctypes.c_uint32), ("layers", ctypes.c_uint32),
                ("k_base", ctypes.POINTER(ctypes.c_uint64)),
                ("v_base", ctypes.POINTER(ctypes.c_uint64)),
                ("page_stride", ctypes.c_uint64), ("token_stride", ctypes.c_uint64),
                ("head_stride", ctypes.c_uint64)]


class GetItem(ctypes.Structure):
    _fields_ = [("key", ctypes.c_void_p), ("key_len", ctypes.c_size_t),
                ("buf", ctypes.c_void_p), ("cap", ctypes.c_size_t),
                ("region", ctypes.c_void_p), ("offset", ctypes.c_uint64),
                ("rc", ctypes.c_int), ("msg", ctypes.c_char * 160),
                ("answered", ctypes.c_bool), ("res", GetResult)]


class GetManyOpts(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("layer_begin", ctypes.c_uint32),
                ("layer_end", ctypes.c_uint32), ("prefix", ctypes.c_bool),
                ("route", ctypes.c_int),  # kvs_route: 0 default, 1 owner, 2 local first
                ("layout", ctypes.POINTER(PageLayout)),  # paged: NULL, or the region's pages
                ("pages", ctypes.POINTER(ctypes.c_uint32)), ("n_pages", ctypes.c_size_t)]


NODE_ID_MAX = 264


# kvs_log_fn (gpu/base/log.h): (ctx, level, line); levels 0 error, 1 warn, 2 info, 3 debug.
LogFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)


class ClusterOpts(ctypes.Structure):
    _fields_ = [("targets", ctypes.c_char_p), ("local", ctypes.c_char_p),
                ("local_id", ctypes.c_char_p), ("resolve_ms", ctypes.c_int64),
                ("backoff_min_ms", ctypes.c_int64), ("backoff_max_ms", ctypes.c_int64),
                ("parallel", ctypes.c_uint), ("client", ClientOpts), ("log", LogFn),
                ("log_ctx", ctypes.c_void_p)]


class ClusterNode(ctypes.Structure):
    _fields_ = [("id", ctypes.c_char * NODE_ID_MAX), ("local", ctypes.c_bool),
                ("up", ctypes.c_bool), ("retry_in_ms", ctypes.c_int64),
                ("failures", ctypes.c_uint64), ("why", ctypes.c_char * 160)]


class Key(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint8), ("bytes", ctypes.c_uint8 * KEY_MAX)]


class BlockCodecs(ctypes.Structure):
    _fields_ = [("key_codec", ctypes.c_char * (CODEC_NAME_MAX + 1)),
                ("value_codec", ctypes.c_char * (CODEC_NAME_MAX + 1))]


class TierStats(ctypes.Structure):
    _fields_ = [("tier", ctypes.c_int), ("capacity_bytes", ctypes.c_uint64),
                ("used_bytes", ctypes.c_uint64), ("blocks", ctypes.c_uint64),
                ("hits", ctypes.c_uint64), ("evictions", ctypes.c_uint64),
                ("recoded_blocks", ctypes.c_uint64), ("recode_saved_bytes", ctypes.c_uint64),
                ("block_meta_bytes", ctypes.c_uint64)]


class RpcStats(ctypes.Structure):
    _fields_ = [("method", ctypes.c_char * 32), ("calls", ctypes.c_uint64),
                ("errors", ctypes.c_uint64)]


class DataPlaneStats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "regions", "region_bytes", "region_pinned_bytes", "region_refused", "put_region_bytes",
        "put_wire_bytes", "get_region_bytes", "get_wire_bytes")]


class AdminProgress(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "verify_planned", "verify_checked", "flush_queued", "flush_done")]


class GpuDeviceStats(ctypes.Structure):
    _fields_ = [("device", ctypes.c_uint32)] + [(f, ctypes.c_uint64) for f in (
        "capacity_bytes", "used_bytes", "blocks", "hits", "demotions", "promotions")]


class Stats(ctypes.Structure):
    _fields_ = [("tiers", TierStats * 3), ("n_tiers", ctypes.c_size_t),
                ("namespaces", ctypes.POINTER(NsInfo)), ("n_namespaces", ctypes.c_size_t),
                ("rpcs", ctypes.POINTER(RpcStats)), ("n_rpcs", ctypes.c_size_t),
                ("misses", ctypes.c_uint64), ("uptime_ms", ctypes.c_uint64),
                ("version", ctypes.c_char * 32), ("data_plane", DataPlaneStats),
                ("admin", AdminProgress), ("gpus", GpuDeviceStats * 16),
                ("n_gpus", ctypes.c_size_t)]


def _candidates():
    env = os.environ.get("KVSTASH_LIB")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, "libkvstash.so.0")
    yield os.path.join(here, "..", "..", "..", "build", "lib", "libkvstash.so.0")
    yield "libkvstash.so.0"  # the dynamic linker's search: LD_LIBRARY_PATH, ld.so.cache
    found = ctypes.util.find_library("kvstash")
    if found:
        yield found


def load():
    """The library with every prototype set (ctypes checks argument counts and types)."""
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            errors.append(f"{path}: {e}")
    else:
        raise ImportError("kvstash: libkvstash not found (set KVSTASH_LIB to its path, or "
                          "build the C library first): " + "; ".join(errors or ["no candidate"]))
    P, E = ctypes.c_void_p, ctypes.POINTER(Err)
    sig = {
        "kvs_client_connect": (ctypes.c_int, [ctypes.POINTER(ClientOpts), ctypes.POINTER(P), E]),
        "kvs_client_close": (None, [P]),
        "kvs_client_put": (ctypes.c_int, [P, ctypes.c_char_p, P, ctypes.c_size_t, ctypes.c_uint32,
                                          ctypes.c_int, P, ctypes.c_size_t,
                                          ctypes.POINTER(PutResult), E]),
        "kvs_client_get": (ctypes.c_int, [P, ctypes.c_char_p, P, ctypes.c_size_t, P,
                                          ctypes.c_size_t, ctypes.POINTER(GetResult), E]),
        "kvs_client_put_many": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.c_int,
                                               ctypes.POINTER(PutItem), ctypes.c_size_t, E]),
        "kvs_client_put_many_paged": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.c_int,
                                                     ctypes.POINTER(PageLayout),
                                                     ctypes.POINTER(PutItem), ctypes.c_size_t, E]),
        "kvs_client_get_many": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(GetItem),
                                               ctypes.c_size_t, ctypes.POINTER(GetManyOpts),
                                               ctypes.POINTER(ctypes.c_size_t), E]),
        "kvs_client_lookup": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(Key),
                                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32),
                                             ctypes.POINTER(ctypes.c_int), E]),
        "kvs_client_lookup_codecs": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(Key),
                                                    ctypes.c_size_t,
                                                    ctypes.POINTER(ctypes.c_uint32),
                                                    ctypes.POINTER(ctypes.c_int),
                                                    ctypes.POINTER(ctypes.c_bool),
                                                    ctypes.POINTER(BlockCodecs), E]),
        "kvs_client_exists": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(Key),
                                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_bool), E]),
        "kvs_client_delete": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(Key),
                                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32),
                                             E]),
        "kvs_client_ns_create": (ctypes.c_int, [P, ctypes.POINTER(NsSpec),
                                                ctypes.POINTER(NsInfo), E]),
        "kvs_client_ns_drop": (ctypes.c_int, [P, ctypes.c_char_p,
                                              ctypes.POINTER(ctypes.c_uint64), E]),
        "kvs_client_ns_get": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(NsInfo), E]),
        "kvs_client_ns_list": (ctypes.c_int, [P, ctypes.POINTER(ctypes.POINTER(NsInfo)),
                                              ctypes.POINTER(ctypes.c_size_t), E]),
        "kvs_client_stats": (ctypes.c_int, [P, ctypes.POINTER(ctypes.POINTER(Stats)), E]),
        "kvs_stats_free": (None, [ctypes.POINTER(Stats)]),
        "kvs_region_create": (ctypes.c_int, [P, ctypes.c_size_t, ctypes.POINTER(P), E]),
        "kvs_region_data": (P, [P]),
        "kvs_region_size": (ctypes.c_size_t, [P]),
        "kvs_region_pinned": (ctypes.c_bool, [P]),
        "kvs_region_close": (None, [P]),
        # CUDA IPC (kvstash.h): handle (64 bytes), offset, bytes, device UUID (16 bytes).
        "kvs_region_create_ipc": (ctypes.c_int, [P, P, ctypes.c_uint64, ctypes.c_uint64, P,
                                                 ctypes.POINTER(P), E]),
        "kvs_region_device": (ctypes.c_bool, [P]),
        "kvs_key_chain_seq": (ctypes.c_size_t, [ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t,
                                                ctypes.c_uint32, ctypes.POINTER(Key),
                                                ctypes.c_size_t]),
        "kvs_key_chain": (None, [P, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t, P]),
    }
    # The sharded client: its data-path and namespace calls have kvs_client's signatures
    # (a kvs_cluster* for the kvs_client*), so the package calls either through one table.
    for verb in ("put", "get", "put_many", "get_many", "lookup", "exists", "delete",
                 "ns_create", "ns_drop", "ns_get"):
        sig[f"kvs_cluster_{verb}"] = sig[f"kvs_client_{verb}"]
    sig.update({
        "kvs_cluster_open": (ctypes.c_int, [ctypes.POINTER(ClusterOpts), ctypes.POINTER(P), E]),
        "kvs_cluster_close": (None, [P]),
        "kvs_cluster_local": (P, [P]),
        "kvs_cluster_owner": (ctypes.c_int, [P, P, ctypes.c_size_t, ctypes.c_char_p, E]),
        "kvs_cluster_nodes": (ctypes.c_int, [P, ctypes.POINTER(ClusterNode), ctypes.c_size_t,
                                             ctypes.POINTER(ctypes.c_size_t), E]),
    })
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


lib = load()


def load_cuda():
    """libkvstash_cuda (decode on this process's GPU) with its prototypes, or None when it
    cannot be loaded (a build without CUDA, no CUDA runtime here). Looked for at
    $KVSTASH_CUDA_LIB, beside the libkvstash that was loaded, then by the dynamic linker."""
    paths = []
    if os.environ.get("KVSTASH_CUDA_LIB"):
        paths.append(os.environ["KVSTASH_CUDA_LIB"])
    if getattr(lib, "_name", None) and os.path.sep in lib._name:
        paths.append(os.path.join(os.path.dirname(lib._name), "libkvstash_cuda.so.0"))
    paths.append("libkvstash_cuda.so.0")
    for path in paths:
        try:
            cl = ctypes.CDLL(path)
            break
        except OSError:
            continue
    else:
        return None
    P, E = ctypes.c_void_p, ctypes.POINTER(Err)
    sig = {
        "kvs_cuda_decoder_create": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(NsSpec),
                                                   ctypes.POINTER(P), E]),
        "kvs_cuda_decoder_destroy": (None, [P]),
        "kvs_decode_block_cuda": (ctypes.c_int, [P, P, ctypes.c_size_t, P, ctypes.c_size_t, P,
                                                 ctypes.POINTER(GetResult), E]),
        "kvs_decode_blocks_cuda": (ctypes.c_int, [P, ctypes.POINTER(CudaBlock), ctypes.c_size_t,
                                                  P, E]),
    }
    for name, (res, args) in sig.items():
        f = getattr(cl, name)
        f.restype, f.argtypes = res, args
    return cl
