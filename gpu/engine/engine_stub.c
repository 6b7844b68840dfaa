/* The GPU engine of a build without CUDA: every entry point answers KVS_ENOTSUP (or
 * "no engine"), so the daemon and the tools code on the CPU. The one place this build
 * differs from a CUDA one (STYLE: no #ifdef forest in engine.c). */
#include "gpu/engine/engine.h"

#include <stdlib.h>
#include <string.h>

int kvs_engine_create(const kvs_engine_opts *opts, kvs_engine **out, kvs_err *err)
{
    *out = NULL;
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
void kvs_engine_destroy(kvs_engine *e) {}
bool kvs_engine_failed(const kvs_engine *e)
{
    return true;
}
const char *kvs_engine_device_name(const kvs_engine *e)
{
    return "none";
}
bool kvs_engine_has_uuid(const kvs_engine *e, const uint8_t *uuid)
{
    return false;
}
int kvs_engine_peer_enable(kvs_engine *e, const kvs_engine *other, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_device_count(int *n, kvs_err *err)
{
    *n = 0;
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
const uint32_t kvs_engine_batch_bounds[KVS_ENGINE_BATCH_BUCKETS] = {1,  2,  4,   8,  16,
                                                                    32, 64, 128, 256};
void kvs_engine_get_stats(const kvs_engine *e, kvs_engine_stats *out)
{
    memset(out, 0, sizeof *out);
}
int kvs_engine_prepare(kvs_engine *e, kvs_codec *c, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
bool kvs_engine_accepts(const kvs_engine *e, const kvs_codec *k, const kvs_codec *v)
{
    return false;
}
int kvs_engine_encode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                      uint32_t t, const uint16_t *raw, uint8_t *out, size_t cap, size_t *len,
                      double *sums, kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_decode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                      size_t len, kvs_block_trust trust, uint32_t layer_begin, uint32_t layer_end,
                      uint16_t *raw, kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}

int kvs_engine_tier_alloc(kvs_engine *e, uint64_t bytes, void **base, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_mem_info(kvs_engine *e, uint64_t *free_bytes, uint64_t *total_bytes, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
size_t kvs_engine_slot_bytes(const kvs_codec *k, const kvs_codec *v, uint32_t t)
{
    return (size_t)kvs_codec_spec(k)->layers *
           (kvs_codec_section_max(k, t) + kvs_codec_section_max(v, t));
}
int kvs_engine_encode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                          const uint16_t *raw, void *slot, uint32_t *lens, kvs_engine_done done,
                          void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_decode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                          const void *slot, const uint32_t *lens, uint32_t layer_begin,
                          uint32_t layer_end, uint16_t *raw, kvs_engine_done done, void *arg,
                          kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_fetch_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                         uint32_t t, const void *slot, const uint32_t *lens, uint8_t *out,
                         size_t cap, size_t *len, kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_fetch_dev_unsealed(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                                  uint32_t ns_id, uint32_t t, const void *slot,
                                  const uint32_t *lens, uint8_t *out, size_t cap, size_t *len,
                                  kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_recode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                          const kvs_codec *k2, const kvs_codec *v2, uint32_t ns_id, uint32_t t,
                          const void *slot, const uint32_t *lens, uint8_t *out, size_t cap,
                          size_t *len, kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_upload_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                          size_t len, kvs_block_trust trust, void *slot, uint32_t *lens,
                          kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_host_register(kvs_engine *e, void *addr, size_t bytes, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
void kvs_engine_host_unregister(kvs_engine *e, void *addr, size_t bytes) {}
int kvs_engine_ipc_open(kvs_engine *e, const uint8_t handle[KVS_ENGINE_IPC_HANDLE_LEN],
                        const uint8_t uuid[KVS_ENGINE_UUID_LEN], void **base, uint64_t *bytes,
                        kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
void kvs_engine_ipc_close(kvs_engine *e, void *base) {}
int kvs_engine_copy(kvs_engine *e, void *dst, const void *src, size_t n, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_gather_dev(kvs_engine *e, const kvs_paged_layout *lay, const void *base,
                          const uint32_t *pages, uint32_t t, void **out, kvs_err *err)
{
    *out = NULL;
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
void kvs_engine_dev_free(kvs_engine *e, void *p) {}
int kvs_engine_decode_paged(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                            const uint8_t *enc, size_t len, kvs_block_trust trust,
                            uint32_t layer_begin, uint32_t layer_end, const kvs_engine_paged *dst,
                            kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
int kvs_engine_decode_dev_paged(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                                const void *slot, const uint32_t *lens, uint32_t layer_begin,
                                uint32_t layer_end, const kvs_engine_paged *dst,
                                kvs_engine_done done, void *arg, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: this build has no CUDA");
}
