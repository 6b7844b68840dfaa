/* Blocking work off the gRPC completion-queue threads (DESIGN §8, GRPC-C-CORE.md "With
 * libuv"): CPU codec encode/decode runs on libuv's thread pool, so the CQ threads keep
 * driving network I/O.
 *
 * Any thread submits (fn, done, arg). The submission goes into a locked queue and wakes
 * the loop with uv_async_send (the only libuv call that is safe from another thread; it
 * coalesces, so the callback drains the whole queue). The loop hands each item to
 * uv_queue_work: fn runs on a pool thread, then done runs on the loop thread (it may
 * start gRPC batches: grpc_call_start_batch is callable from any thread).
 *
 * Shutdown: kvs_work_close (loop thread) refuses further submissions; kvs_work_submit
 * then returns KVS_EUNAVAIL and the caller runs the work inline. Items already queued
 * still run: the loop keeps running until their done callbacks have. kvs_work_destroy
 * frees the mailbox once the loop has finished and no thread submits any more (after the
 * gRPC server is shut down).
 */
#ifndef KVS_DAEMON_WORK_H
#define KVS_DAEMON_WORK_H

#include <uv.h>

#include "gpu/base/err.h"

typedef struct kvs_work kvs_work;
typedef void (*kvs_work_fn)(void *arg);

/* Creates the mailbox on loop (loop thread). */
int kvs_work_create(uv_loop_t *loop, kvs_work **out, kvs_err *err);

/* Runs fn(arg) on a pool thread, then done(arg) on the loop thread; fn NULL: done alone,
 * on the loop thread (a completion handed off the thread that finished the work, e.g.
 * the GPU engine's). Thread-safe. KVS_EUNAVAIL once closed (the caller then runs fn and
 * done itself). */
int kvs_work_submit(kvs_work *w, kvs_work_fn fn, kvs_work_fn done, void *arg);

/* kvs_work_submit, or fn (if any) then done right here when w is NULL or closed: the
 * run hook the data path and the tiering take (storage/xfer.h), ctx = w. */
void kvs_work_run(void *w, kvs_work_fn fn, kvs_work_fn done, void *arg);

/* Loop thread: refuse new submissions, start what is queued, close the async handle. */
void kvs_work_close(kvs_work *w);
/* After uv_run has returned and nothing submits any more. NULL is allowed. */
void kvs_work_destroy(kvs_work *w);

#endif
