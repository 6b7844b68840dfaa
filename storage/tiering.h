/* Moves between the GPU and host tiers (DESIGN §7). Demotion, in the background: while
 * the GPU tier is above its high watermark, its least recently used idle blocks move to the
 * host tier, down to the low watermark. Promotion: a Get of a host block copies it to the
 * GPU tier while that is below its high watermark (kvs_tiering_promote). The bytes travel through
 * the GPU engine (kvs_engine_fetch_dev: D2H of the slot, framing and checksum on the host); the
 * store swaps the host copy in (kvs_store_demote_commit). Precision demotion (host_codec,
 * gpu/codec/spec.h): where the host tier's codec is colder than a side of the block
 * (kvs_ns_colder), the engine re-encodes it on the device before the copy
 * (kvs_engine_recode_dev), so only the colder bytes cross the bus; where it has no kernels
 * for that codec, the pool re-encodes the fetched block (kvs_block_transcode, the same
 * bytes). A promotion keeps the block's encoding (its slot is sized for its codecs). Demotion never
 * blocks a Put or Get: a Put that finds the GPU tier full lands in the host tier, and readers of a
 * block being demoted keep using its slot until they let go.
 *
 * Threading: kvs_tiering_kick may be called from any thread (it returns at once when a
 * round is already running); completions come back from the engine thread through the
 * run hook (the daemon's loop thread) and start the next round while the tier is still
 * above the high watermark. One round at a time; explicit
 * demotions (kvs_tiering_demote, an operator's evict) run beside it on blocks of their own.
 */
#ifndef KVS_STORAGE_TIERING_H
#define KVS_STORAGE_TIERING_H

#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/engine/engine.h"
#include "storage/store.h"

typedef struct kvs_tiering kvs_tiering;

/* Runs done(arg) on the caller's completion thread (fn is always NULL here; the same
 * hook as storage/xfer.h's opts.run). */
typedef void (*kvs_tiering_run_fn)(void *ctx, void (*fn)(void *), void (*done)(void *), void *arg);

/* store and engines are borrowed and must outlive the tiering object: engines[g] runs the
 * store's gpu tier of device g (n of them). Engine completions are handed to run (NULL:
 * handled on the engine thread). */
kvs_tiering *kvs_tiering_create(kvs_store *st, kvs_engine *const *engines, unsigned n,
                                kvs_tiering_run_fn run, void *run_ctx);
/* Starts a demotion round of each device's gpu tier that is above its high watermark and
 * has none running. */
void kvs_tiering_kick(kvs_tiering *t);
/* Moves picked GPU blocks (each holding the demoter's reference: kvs_store_evict's
 * picks) to the host tier through the engine, outside the watermark rounds, and waits until
 * every move has ended (committed or cancelled); returns how many moved. A
 * kvs_store_demote_fn (arg = t). Blocks the caller: never call it on the engine thread. */
size_t kvs_tiering_demote(void *t, kvs_block **picked, size_t n);
/* Promotion on Get (DESIGN §7): starts copying host block blk (the caller holds a
 * reference, needed only during the call) to a gpu tier through its engine: device `near`
 * (the reader's: a Get into that device's memory) when it has room below its high
 * watermark, else the device with the most room (near < 0: no reader device), if the
 * store allows it (kvs_store_promote_begin: promotion on, room below the gpu tier's high
 * watermark) and the engine has kernels for its codecs; returns at once. When the copy is
 * done, the gpu copy takes the host block's place (kvs_store_promote_commit), unless the
 * block was deleted or replaced meanwhile. blk's bytes are those kvs_store_find verified
 * (invariant 4: read-only while referenced), so the upload does not hash them again.
 * Any thread. */
void kvs_tiering_promote(kvs_tiering *t, kvs_block *blk, int near);
/* Waits for the round and the promotions in flight (the engine must still run), then
 * frees. NULL is fine. */
void kvs_tiering_destroy(kvs_tiering *t);

#endif
