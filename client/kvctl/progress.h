/* kvctl progress bars (DESIGN §10; issue 14 item 5): one line on stderr for long work
 * (verify, flush, bench), so that an operator sees it move, while stdout keeps only the
 * command's result and scripts see clean output.
 *
 * With a total: "verify [#########...............]  450/1200 blocks  37%  150 blocks/s  ETA 5.0s";
 * without one (not known yet, or never): "flush | 450 blocks  150 blocks/s  3.0s" with a
 * turning spinner. On a terminal the line is redrawn in place ("\r", erase to its end) at
 * most 10 times a second; forced onto something else (--progress), one line per second,
 * each ended by a newline. The last line (kvctl_progress_finish) stays, with the time taken.
 * kvctl_progress_render is the pure part (view -> text), for tests.
 *
 * Threading: kvctl_progress_set may be called from any thread (the struct's mutex);
 * start, finish and kvctl_progress_during from the thread that owns the bar.
 */
#ifndef KVCTL_PROGRESS_H
#define KVCTL_PROGRESS_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum kvctl_progress_mode {
    KVCTL_PROGRESS_AUTO = 0, /* a bar when stderr is a terminal */
    KVCTL_PROGRESS_ON = 1,   /* --progress: always */
    KVCTL_PROGRESS_OFF = 2,  /* --no-progress: never */
} kvctl_progress_mode;

/* What one line shows. */
typedef struct kvctl_progress_view {
    const char *label; /* "verify"; borrowed */
    const char *unit;  /* "blocks"; borrowed */
    uint64_t done;     /* units done so far */
    uint64_t total;    /* units in all; 0 = unknown (a spinner instead of a bar) */
    double elapsed_s;  /* since the start */
    unsigned frame;    /* spinner frame (any number: taken modulo the frames) */
    bool finished;     /* the last line: the time taken instead of an ETA */
} kvctl_progress_view;

/* Writes the line for v into buf (len bytes, at least 1; truncated to fit), without a
 * newline or control characters; returns buf. done above total is shown as total (another
 * client's call may add to the counters a bar is drawn from). The rate appears once 0.1 s
 * went by, the ETA once the rate is known. */
const char *kvctl_progress_render(const kvctl_progress_view *v, char *buf, size_t len);

/* Whether to draw: mode ON or OFF as it says, AUTO when f is a terminal. */
bool kvctl_progress_wanted(kvctl_progress_mode mode, FILE *f);

typedef struct kvctl_progress {
    FILE *f;
    bool on;  /* drawing at all (off: every call is a no-op) */
    bool tty; /* redraw in place (else one line per draw) */
    pthread_mutex_t mu;
    kvctl_progress_view v; /* under mu */
    double t0, last;       /* monotonic seconds: the start, the last draw */
} kvctl_progress;

/* Starts a bar on f (borrowed; stderr) if on; label and unit are borrowed until finish.
 * total 0: unknown for now. Draws the first line at once. */
void kvctl_progress_start(kvctl_progress *p, FILE *f, bool on, const char *label, const char *unit,
                          uint64_t total);
/* New counts (total 0 keeps the one known); redraws unless the last draw is too recent. */
void kvctl_progress_set(kvctl_progress *p, uint64_t done, uint64_t total);
/* Draws the last line with these counts (total 0: a count without a bar) and the time
 * taken, then a newline, and frees what start took. */
void kvctl_progress_finish(kvctl_progress *p, uint64_t done, uint64_t total);
/* The same with the counts the bar has (the work failed: its error follows). */
void kvctl_progress_stop(kvctl_progress *p);

/* Runs work(arg) on this thread while a helper thread, every 100 ms, asks poll(arg, &done,
 * &total) (may be NULL: only the spinner turns) and redraws; returns work's result once
 * the helper stopped. poll runs on the helper thread, beside work: what it reads must be
 * safe to read there. When the bar is off (or the helper cannot start), work alone. */
int kvctl_progress_during(kvctl_progress *p, int (*work)(void *arg),
                          void (*poll)(void *arg, uint64_t *done, uint64_t *total), void *arg);

#endif
