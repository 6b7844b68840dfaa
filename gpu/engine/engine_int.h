/* Private to the GPU engine's files: engine.c (the thread, batching, encode and decode),
 * engine_tier.c (the GPU tier's jobs: slots in and out) and engine_job.c (what both use:
 * submission, completion, block checks and framing). The job and engine structures.
 * Nothing else includes this. Calls go one way: engine.c -> engine_tier.c -> engine_job.c.
 */
#ifndef KVS_GPU_ENGINE_INT_H
#define KVS_GPU_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "gpu/engine/engine.h"
#include "gpu/codec/format.h"

typedef enum { JOB_ENCODE, JOB_DECODE, JOB_FETCH, JOB_UPLOAD, JOB_RECODE } job_kind;

typedef struct job {
    job_kind kind;
    bool dev; /* encode/decode: the encoded side is a GPU tier slot, not host memory */
    const kvs_codec *k, *v;
    const kvs_codec *k2, *v2; /* recode: the codecs the slot's block is re-encoded with */
    uint32_t t, lb, le, ns_id;
    const uint16_t *raw_in; /* encode */
    uint8_t *out;           /* encode (host), fetch, recode */
    size_t cap, *len;
    const uint8_t *enc; /* decode, upload (host) */
    size_t enc_len;
    uint16_t *raw_out;     /* decode */
    union {                /* dev encode/decode, fetch, upload, recode: device address */
        uint8_t *out;      /* written: dev encode, upload */
        const uint8_t *in; /* read: dev decode, fetch, recode */
    } slot;
    union {                 /* 2L section lengths (host) */
        uint32_t *out;      /* dev encode, upload */
        const uint32_t *in; /* dev decode, fetch, recode */
    } lens;
    bool pinned_host; /* upload, fetch: the host block is pinned memory (DMA'd in place) */
    bool direct;      /* ...and its sections are fixed-size, at their framed places: two
                       * strided DMAs between it and the slot; else its body is packed on the
                       * device (engine_tier.c, above kvs__engine_do_fetch) */
    bool unsealed; /* fetch: the checksum is left for the caller (kvs_engine_fetch_dev_unsealed) */
    bool pinned_raw; /* encode, decode: the raw buffer is pinned host memory or device
                      * memory (a worker's, by CUDA IPC): DMA'd straight to or from d_raw,
                      * no staging (engine.c, move_raw) */
    bool raw_dev;    /* ...device memory: the CPU fallbacks copy it through the host */
    const kvs_engine_paged *paged; /* decode: scattered into pages, not raw_out (borrowed) */
    double *sums;                  /* encode: measured (engine.h, "Measured encode") */
    kvs_engine_done done;
    void *arg;
    uint64_t enq_us;
    struct job *next;
} job;

struct kvs_engine {
    kvs_engine_opts o;
    char name[256];
    uint8_t uuid[16]; /* the device's (kvs_engine_has_uuid) */
    pthread_t thread;
    pthread_mutex_t mu;      /* guards the queue and stop */
    pthread_mutex_t prep_mu; /* serializes codec table uploads (kvs_engine_prepare) */
    pthread_cond_t cv;
    job *head, *tail;
    bool stop;
    atomic_bool failed;
    cudaStream_t st;
    /* The side stream of the data path's synchronous steps on a worker's memory
     * (kvs_engine_gather_dev: allocation, gather, free; engine_ipc.c), under aux_mu, a
     * leaf lock taken by any thread; never the batch stream, so they do not wait for
     * batches. */
    cudaStream_t aux;
    pthread_mutex_t aux_mu;
    uint8_t *h_raw, *h_enc, *d_raw, *d_enc; /* staging_bytes each */
    uint32_t *h_layers, *d_layers;          /* max_sections each */
    uint32_t *h_len, *d_len;                /* 2 * max_sections each: K, then V */
    unsigned long long *h_bad, *d_bad;      /* [2]: keys, values */
    /* Measured encodes: the batch's sections decoded again (d_meas, staging_bytes) and
     * their error sums (2 per section, keys' then values' sections: 4 * max_sections). */
    uint16_t *d_meas;
    double *h_sums, *d_sums;
    size_t max_sections;
    /* The batch's device-to-device copies (kvs__engine_copy_dd), run by one launch each
     * flush (gpu/codec/copies.h): [0, copies_flushed) are uploaded and launched, the rest
     * queued; emptied once the batch's stream passed them (kvs__engine_copies_reset). */
    struct kvs_copy2d *h_copies, *d_copies; /* copies_cap each */
    uint32_t copies_cap, copies_used, copies_flushed;
    uint64_t copies_max; /* the largest queued copy's bytes */
    void *tier;          /* the GPU tier's region (kvs_engine_tier_alloc) */
    /* kvs_engine_get_stats: written by the engine thread only, read by anyone. */
    atomic_uint_fast64_t batches[KVS_ENGINE_BATCH_BUCKETS + 1];
    atomic_uint_fast64_t batch_requests;
};

/* engine_job.c */
uint64_t kvs__engine_now_us(void);
/* Elements of one section (t tokens of every head of a layer). */
size_t kvs__engine_sec_elems(const kvs_codec *k, uint32_t t);
/* Bytes of staging one request takes on the raw side and on the encoded side. */
void kvs__engine_footprint(const job *j, size_t *raw, size_t *enc);
/* Runs j's callback and frees j. */
void kvs__engine_finish(job *j, int rc, const kvs_err *err);
/* kvs__engine_finish for every job of a list. */
void kvs__engine_fail_all(job *list, int rc, const kvs_err *err);
/* Marks the engine failed when rc is an error the device does not recover from (the
 * engine thread asks the stream after a batch whose CUDA calls failed). */
void kvs__engine_note_error(kvs_engine *e, cudaError_t rc);
/* Queues j (taken over: freed on error) for the engine thread. */
int kvs__engine_submit(kvs_engine *e, job *j, kvs_err *err);
/* Frames one block's sections (host memory: K of layer l at kb + l*sk with length
 * klen[l], V likewise) into out as an encoded block (kvs_block_frame), sealed. Returns its
 * size; out holds kvs_block_encoded_max bytes. kb NULL: the sections are in out already,
 * at their framed places (a direct copy); only the header, table and checksum are
 * written. */
size_t kvs__engine_frame_block(const job *j, const uint8_t *kb, size_t sk, const uint32_t *klen,
                               const uint8_t *vb, size_t sv, const uint32_t *vlen, uint8_t *out);
/* Checks an encoded block before a job reads it: kvs_block_parse (with the checksum unless
 * trust says the caller verified it), and every section of layers [layer_begin,
 * layer_end) (0: all) within the codecs' largest (exactly that size for fixed-size codecs,
 * whose kernels do not read lengths). Fills *info. */
int kvs__engine_check_block(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                            kvs_block_trust trust, uint32_t layer_begin, uint32_t layer_end,
                            kvs_block_info *info, kvs_err *err);
/* Where a buffer lives, from one cudaPointerGetAttributes call: PINNED is host memory
 * registered with (or allocated by) CUDA, which a copy engine reaches without a staging
 * buffer; DEVICE is device memory (this process's, or another's opened by CUDA IPC). */
typedef enum kvs__engine_mem {
    KVS__MEM_PAGEABLE,
    KVS__MEM_PINNED,
    KVS__MEM_DEVICE
} kvs__engine_mem;
kvs__engine_mem kvs__engine_mem_of(const void *p);
/* Sets j->pinned_raw and j->raw_dev for its raw buffer `raw` (a paged job's raw side is
 * the worker's device memory whatever `raw` is). */
void kvs__engine_raw_mem(job *j, const void *raw);

/* Device-to-device copies of a batch, on the engine thread: kvs__engine_copy_dd queues a
 * 2D copy (height rows of width bytes at the pitches; both sides memory the device reaches:
 * its own, a worker's by CUDA IPC, pinned host memory of a paged region) for the
 * next flush, or issues it at once as cudaMemcpy2DAsync when the table is full;
 * kvs__engine_copies_flush uploads the queued ones and runs them in one launch on the
 * stream (nothing queued: nothing done); kvs__engine_copies_reset empties the table: after
 * the batch's synchronization (synced), or before the next batch, which waits for the stream
 * first if anything was flushed (a batch that failed part-way may not have synchronized). */
int kvs__engine_copy_dd(kvs_engine *e, void *dst, size_t dpitch, const void *src, size_t spitch,
                        size_t width, size_t height, kvs_err *err);
int kvs__engine_copies_flush(kvs_engine *e, kvs_err *err);
void kvs__engine_copies_reset(kvs_engine *e, bool synced);
/* Grows the table (waiting for the stream first) so that `more` copies can be queued, up
 * to its largest size (past it, copies are issued one by one). KVS_ENOMEM naming the size
 * when the memory cannot be had. */
int kvs__engine_copies_reserve(kvs_engine *e, uint32_t more, kvs_err *err);

/* A batch runner (engine thread): runs a batch of nb jobs of one kind and finishes every
 * one; returns KVS_EINTERNAL when a CUDA call failed on the way, else 0. */
typedef int (*kvs__engine_runner)(kvs_engine *e, job *list, uint32_t nb);
/* engine_tier.c: the runners of fetch jobs and of upload jobs. */
int kvs__engine_do_fetch(kvs_engine *e, job *list, uint32_t nb);
int kvs__engine_do_upload(kvs_engine *e, job *list, uint32_t nb);
/* engine_recode.c: the runner of recode jobs. */
int kvs__engine_do_recode(kvs_engine *e, job *list, uint32_t nb);

#endif
