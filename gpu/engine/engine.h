/* The GPU codec engine (DESIGN §2, §8; issue 4): one per GPU. It owns a thread, a CUDA
 * stream, pinned staging buffers and device scratch, all allocated at start (nothing is
 * allocated on the data path). Requests from many calls are gathered into batches (up to
 * max_batch blocks, or until the oldest has waited deadline_us) and each batch is one
 * launch per codec: keys of all its blocks, then values.
 *
 * Encode: raw block (host) -> pinned -> H2D -> encode kernels -> D2H -> the host writes the
 * block header, section table and checksum (gpu/codec/format.h) into the caller's buffer.
 * Decode: encoded block (host) -> checksum and layout checked on the host -> sections of
 * the requested layers -> pinned -> H2D -> decode kernels -> D2H -> raw layers in the
 * caller's buffer, layout [layers][2][t][H][D].
 *
 * Completion: done(arg, rc, err) runs on the engine thread once the result is in the
 * caller's buffer (or failed); it must not block. A failed launch fails only the requests
 * of its batch, with KVS_EINTERNAL and the CUDA error text; a sticky device error puts the
 * engine in a failed state where every request fails at once (kvs_engine_failed).
 *
 * GPU tier (DESIGN §7): the engine also owns the tier's device memory (one region,
 * kvs_engine_tier_alloc; storage/slots.h cuts it into slots) and moves blocks in and out
 * of slots (gpu/engine/engine_tier.c): encode straight into a slot (no D2H of the encoded bytes),
 * decode straight from a slot, fetch a slot back to the host as a framed, sealed block
 * (demotion to the host tier, Get ENCODED), re-encode a slot with colder codecs on the way
 * (precision demotion, gpu/engine/engine_recode.c), and upload a host block's sections into
 * a slot (promotion on Get). Slot layout of a block of t tokens and L layers: the key
 * sections of layers 0..L-1 at stride kvs_codec_section_max(k, t), then the value
 * sections at stride kvs_codec_section_max(v, t); the section lengths live on the host
 * (lens[2L]: keys of each layer, then values). The bytes in a slot are not checksummed
 * (they never left the device: HBM has ECC); the checksum is computed when a slot is
 * fetched to the host.
 *
 * Threading: submit from any thread; the engine thread is the only one that touches the
 * device, the stream and the staging buffers.
 */
#ifndef KVS_ENGINE_H
#define KVS_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/paged.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_engine kvs_engine;

typedef struct kvs_engine_opts {
    int device;           /* CUDA device ordinal */
    size_t staging_bytes; /* pinned staging per direction; bounds a batch (default 256 MiB) */
    uint32_t max_batch;   /* blocks per batch (default 256) */
    uint32_t deadline_us; /* longest wait to fill a batch (default 200) */
} kvs_engine_opts;

/* Starts the engine on opts->device. KVS_ENOTSUP without CUDA or without that device. */
int kvs_engine_create(const kvs_engine_opts *opts, kvs_engine **out, kvs_err *err);
/* Finishes queued requests, stops the thread, frees everything. NULL is allowed. */
void kvs_engine_destroy(kvs_engine *e);
bool kvs_engine_failed(const kvs_engine *e);
/* Device name, for logs. */
const char *kvs_engine_device_name(const kvs_engine *e);
/* True when the engine runs the device of this UUID (cudaDeviceProp.uuid): a worker's CUDA
 * IPC memory is opened by the engine of its device. */
bool kvs_engine_has_uuid(const kvs_engine *e, const uint8_t *uuid);
/* How many CUDA devices this process sees (--gpu all): KVS_ENOTSUP without CUDA, or
 * KVS_EUNAVAIL naming the runtime's error (no driver, no device). */
int kvs_engine_device_count(int *n, kvs_err *err);
/* Lets e's kernels read the device memory of `other`'s device (its GPU tier's slots): 0
 * when they can (the same device, or peer access enabled: NVLink or PCIe P2P, where
 * cudaDeviceCanAccessPeer says so), KVS_ENOTSUP naming why not. Then e decodes a block
 * straight from a slot of other's tier (kvs_engine_decode_dev), the encoded bytes crossing
 * the link, not the raw ones. Call once per pair at start; thread-safe. */
int kvs_engine_peer_enable(kvs_engine *e, const kvs_engine *other, kvs_err *err);

/* Batches the engine thread ran, by size (requests per batch, all kinds together):
 * batches[i] counts those of at most kvs_engine_batch_bounds[i] requests and more than the
 * bound before (not cumulative); batches[KVS_ENGINE_BATCH_BUCKETS], those above the last
 * bound. Relaxed atomics: a snapshot may be a batch behind. Thread-safe; zeros without
 * CUDA. */
#define KVS_ENGINE_BATCH_BUCKETS 9
extern const uint32_t kvs_engine_batch_bounds[KVS_ENGINE_BATCH_BUCKETS];
typedef struct kvs_engine_stats {
    uint64_t batches[KVS_ENGINE_BATCH_BUCKETS + 1];
    uint64_t requests; /* requests in those batches (the histogram's sum) */
} kvs_engine_stats;
void kvs_engine_get_stats(const kvs_engine *e, kvs_engine_stats *out);

/* Uploads codec c's device tables (once; idempotent) so that the engine can run it: call
 * it when the codec is made, before anyone else can see it (the store does, for every codec
 * it adds to a namespace). KVS_ENOTSUP when there are no kernels for the codec and layout
 * (the CPU codes it then). Blocking (a table upload); thread-safe. */
int kvs_engine_prepare(kvs_engine *e, kvs_codec *c, kvs_err *err);
/* True if the engine can run both codecs: kernels exist and kvs_engine_prepare succeeded
 * for each; the caller falls back to the CPU otherwise. Lock-free, any thread. */
bool kvs_engine_accepts(const kvs_engine *e, const kvs_codec *k, const kvs_codec *v);

typedef void (*kvs_engine_done)(void *arg, int rc, const kvs_err *err);

/* Encodes a raw block of t tokens (borrowed until done runs) into out (cap bytes, at least
 * kvs_block_encoded_max(k, v, t)); *len is set before done runs.
 *
 * Measured encode (issue 16; gpu/codec/fidelity.h): with sums not NULL (4 doubles,
 * borrowed until done), the engine also decodes the sections it encoded and reduces their
 * error against the input on the device, in the same batch: sums = {keys' sum of squared
 * differences, keys' sum of squares, the same for values} over the whole block (so
 * kvs_fidelity_ratio(sums[0], sums[1]) is the keys' relative error), set before done
 * runs; sums[0] is NaN where the engine did not measure (a batch the CPU reference redid:
 * the caller measures on the CPU then). Costs a decode and one read of both buffers on the
 * GPU, and one more raw staging buffer of device memory (d_meas, allocated at start). */
int kvs_engine_encode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                      uint32_t t, const uint16_t *raw, uint8_t *out, size_t cap, size_t *len,
                      double *sums, kvs_engine_done done, void *arg, kvs_err *err);

/* Decodes layers [layer_begin, layer_end) of an encoded block (borrowed until done runs)
 * into raw. The block must have been encoded with these codecs' state versions. It is
 * checked before it is queued (kvs_block_parse with trust: the checksum unless the
 * caller verified it, KVS_EDATALOSS on a mismatch), and every section of the layers asked
 * for must fit what the codecs write (KVS_EPROTO). */
int kvs_engine_decode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                      size_t len, kvs_block_trust trust, uint32_t layer_begin, uint32_t layer_end,
                      uint16_t *raw, kvs_engine_done done, void *arg, kvs_err *err);

/* A paged destination in device memory (gpu/codec/paged.h; a worker's KV cache opened by
 * CUDA IPC): the decoded layers are scattered into the block's pages instead of written
 * contiguously. All borrowed until done runs; kvs_paged_check accepted (lay, pages, the
 * block's tokens) for the memory at base, and the layer range. */
typedef struct kvs_engine_paged {
    const kvs_paged_layout *lay;
    uint8_t *base;
    const uint32_t *pages;
} kvs_engine_paged;

/* kvs_engine_decode into a paged destination. */
int kvs_engine_decode_paged(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                            const uint8_t *enc, size_t len, kvs_block_trust trust,
                            uint32_t layer_begin, uint32_t layer_end, const kvs_engine_paged *dst,
                            kvs_engine_done done, void *arg, kvs_err *err);

/* ---------------------------------------------------------------- GPU tier */

/* Allocates the GPU tier's region of `bytes` on the engine's device (once; freed by
 * kvs_engine_destroy) into *base (a device address). */
int kvs_engine_tier_alloc(kvs_engine *e, uint64_t bytes, void **base, kvs_err *err);
/* Free and total memory of the engine's device, for sizing the tier as a share. */
int kvs_engine_mem_info(kvs_engine *e, uint64_t *free_bytes, uint64_t *total_bytes, kvs_err *err);
/* Bytes a block of t tokens takes in a slot (layout above). */
size_t kvs_engine_slot_bytes(const kvs_codec *k, const kvs_codec *v, uint32_t t);

/* Encodes a raw block of t tokens (host, borrowed until done) into the device slot;
 * lens (host, 2L entries, borrowed) receives the section lengths before done runs. */
int kvs_engine_encode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                          const uint16_t *raw, void *slot, uint32_t *lens, kvs_engine_done done,
                          void *arg, kvs_err *err);
/* Decodes layers [layer_begin, layer_end) of the block in a device slot (written by
 * kvs_engine_encode_dev with these codecs' state versions) into raw (host). */
int kvs_engine_decode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                          const void *slot, const uint32_t *lens, uint32_t layer_begin,
                          uint32_t layer_end, uint16_t *raw, kvs_engine_done done, void *arg,
                          kvs_err *err);
/* kvs_engine_decode_dev into a paged destination. */
int kvs_engine_decode_dev_paged(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                                const void *slot, const uint32_t *lens, uint32_t layer_begin,
                                uint32_t layer_end, const kvs_engine_paged *dst,
                                kvs_engine_done done, void *arg, kvs_err *err);
/* Copies the block in a device slot to the host as an encoded block (gpu/codec/format.h) stamped
 * with ns_id and sealed: out (cap bytes, at least kvs_block_encoded_max), *len set. */
int kvs_engine_fetch_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                         uint32_t t, const void *slot, const uint32_t *lens, uint8_t *out,
                         size_t cap, size_t *len, kvs_engine_done done, void *arg, kvs_err *err);
/* kvs_engine_fetch_dev with the checksum field left zero: the engine thread, which
 * serves every job of its device in turn, does not hash the block (XXH3 of a 2 MiB block
 * costs more than its copy). The caller seals it (kvs_format_seal) on its own threads, or
 * decodes it as bytes it verified (KVS_BLOCK_VERIFIED: they came from our own slot). */
int kvs_engine_fetch_dev_unsealed(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                                  uint32_t ns_id, uint32_t t, const void *slot,
                                  const uint32_t *lens, uint8_t *out, size_t cap, size_t *len,
                                  kvs_engine_done done, void *arg, kvs_err *err);
/* Precision demotion (gpu/codec/spec.h host_codec): the block in a device slot (encoded with
 * k and v, as kvs_engine_fetch_dev reads it) re-encoded on the device with k2 and v2 and
 * copied to the host as an encoded block stamped with ns_id and sealed, the bytes
 * kvs_block_transcode writes on the CPU: a side whose codec stays (k2 == k, v2 == v) keeps
 * its sections as they are, the other is decoded and encoded again by the kernels, so only
 * the colder bytes cross the bus. out: cap bytes, at least kvs_block_encoded_max of both
 * pairs; *len set. Where the kernels flag a section (malformed, or a value the colder codec
 * refuses), the CPU reference re-encodes the slot's bytes instead, and if it cannot either,
 * out holds the block as it was (as kvs_engine_fetch_dev writes it): out's header says
 * which codecs it has. KVS_ENOTSUP when the engine does not run all four codecs. */
int kvs_engine_recode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                          const kvs_codec *k2, const kvs_codec *v2, uint32_t ns_id, uint32_t t,
                          const void *slot, const uint32_t *lens, uint8_t *out, size_t cap,
                          size_t *len, kvs_engine_done done, void *arg, kvs_err *err);
/* Copies an encoded block (host, borrowed until done; checked as kvs_engine_decode checks
 * it) into a device slot of kvs_engine_slot_bytes(k, v, its tokens), in slot layout; lens
 * (host, 2L entries, borrowed) receives the section lengths before done runs. The block
 * must have been encoded with these codecs' state versions. Promotion to the GPU tier. */
int kvs_engine_upload_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                          size_t len, kvs_block_trust trust, void *slot, uint32_t *lens,
                          kvs_engine_done done, void *arg, kvs_err *err);
/* Pins host memory for the engine's copies (cudaHostRegister; slow: do it once per large
 * region, as storage/hostpool does), and undoes it. Upload and fetch then move the
 * sections of a block in such memory by DMA, without the staging buffers (when its codecs
 * have fixed-size sections; RotateKV's go through the staging). */
int kvs_engine_host_register(kvs_engine *e, void *addr, size_t bytes, kvs_err *err);
void kvs_engine_host_unregister(kvs_engine *e, void *addr, size_t bytes);

/* ---------------------------------------------------------------- worker memory */

/* CUDA IPC (gpu/engine/engine_ipc.c): opens device memory another process on this host
 * exported (cudaIpcGetMemHandle: handle, 64 bytes) on the engine's device, whose UUID
 * (16 bytes) it must name: KVS_EINVAL for another GPU's memory (the message names both)
 * or a handle the driver refuses. *base: the allocation's start here; *bytes: its size
 * as the driver knows it (what may be touched). Encode and decode jobs then take raw
 * buffers in it (device memory: moved by device copies, never staged through the host).
 * Close with kvs_engine_ipc_close once nothing uses it. Any thread; slow (once per
 * registration). */
#define KVS_ENGINE_IPC_HANDLE_LEN 64
#define KVS_ENGINE_UUID_LEN 16
int kvs_engine_ipc_open(kvs_engine *e, const uint8_t handle[KVS_ENGINE_IPC_HANDLE_LEN],
                        const uint8_t uuid[KVS_ENGINE_UUID_LEN], void **base, uint64_t *bytes,
                        kvs_err *err);
void kvs_engine_ipc_close(kvs_engine *e, void *base);
/* Copies n bytes between any two addresses the engine's device reaches (host memory,
 * device memory, memory opened by IPC), synchronously: the data path's rare CPU steps on
 * a worker's device memory. Any thread. */
int kvs_engine_copy(kvs_engine *e, void *dst, const void *src, size_t n, kvs_err *err);
/* Gathers one paged block from device memory (base: a worker's KV cache opened by CUDA IPC;
 * lay, pages and t checked by kvs_paged_check against its length) into a new contiguous
 * device buffer *out of kvs_paged_block_bytes(lay, t, 0, layers) bytes, layout
 * [L][2][t][H][D]: a paged Put from GPU memory becomes a Put from device memory like any
 * other. Synchronous, on the engine's side stream (not its batch stream); any thread.
 * KVS_ENOMEM when the device has no room. Free *out with kvs_engine_dev_free once no job
 * reads it. */
int kvs_engine_gather_dev(kvs_engine *e, const kvs_paged_layout *lay, const void *base,
                          const uint32_t *pages, uint32_t t, void **out, kvs_err *err);
void kvs_engine_dev_free(kvs_engine *e, void *p);

#ifdef __cplusplus
}
#endif
#endif
