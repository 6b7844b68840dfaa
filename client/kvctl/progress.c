/* kvctl progress bars: see progress.h. */
#include "progress.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvctl.h"

#define BAR 24             /* cells of the bar */
#define TTY_EVERY 0.1      /* seconds between redraws on a terminal: 10 a second */
#define LINE_EVERY 1.0     /* ...and between lines elsewhere (--progress into a file) */
#define POLL_NS 100000000L /* kvctl_progress_during's helper: 100 ms */

static const char SPIN[] = "|/-\\";

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with a valid pointer on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Appends to buf (len bytes) at *at, keeping it terminated; what does not fit is cut. */
static void put(char *buf, size_t len, size_t *at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void put(char *buf, size_t len, size_t *at, const char *fmt, ...)
{
    if (*at + 1 >= len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *at, len - *at, fmt, ap);
    va_end(ap);
    if (n > 0)
        *at = *at + (size_t)n < len ? *at + (size_t)n : len - 1;
}

const char *kvctl_progress_render(const kvctl_progress_view *v, char *buf, size_t len)
{
    size_t at = 0;
    buf[0] = 0;
    uint64_t done = v->total && v->done > v->total ? v->total : v->done;
    put(buf, len, &at, "%s ", v->label);
    if (v->total) {
        size_t full = (size_t)((double)done / (double)v->total * BAR);
        char bar[BAR + 1];
        memset(bar, '#', full);
        memset(bar + full, '.', BAR - full);
        bar[BAR] = 0;
        put(buf, len, &at, "[%s]  %llu/%llu %s  %u%%", bar, (unsigned long long)done,
            (unsigned long long)v->total, v->unit,
            (unsigned)((double)done * 100 / (double)v->total));
    } else {
        put(buf, len, &at, "%c %llu %s", v->finished ? ' ' : SPIN[v->frame % 4],
            (unsigned long long)done, v->unit);
    }
    /* The rate once it means something; before, a single early unit would read as
     * thousands a second. */
    double rate = v->elapsed_s >= 0.1 ? (double)done / v->elapsed_s : 0;
    if (v->elapsed_s >= 0.1)
        put(buf, len, &at, rate < 10 ? "  %.1f %s/s" : "  %.0f %s/s", rate, v->unit);
    char d[32];
    if (v->finished || !v->total) {
        put(buf, len, &at, "  %s",
            kvctl_fmt_duration_ms((uint64_t)(v->elapsed_s * 1000), d, sizeof d));
    } else if (rate > 0 && done < v->total) {
        double eta = (double)(v->total - done) / rate;
        put(buf, len, &at, "  ETA %s", kvctl_fmt_duration_ms((uint64_t)(eta * 1000), d, sizeof d));
    }
    return buf;
}

bool kvctl_progress_wanted(kvctl_progress_mode mode, FILE *f)
{
    if (mode != KVCTL_PROGRESS_AUTO)
        return mode == KVCTL_PROGRESS_ON;
    return isatty(fileno(f)) == 1;
}

/* Draws the line now; under p->mu. */
static void draw_locked(kvctl_progress *p, double now)
{
    char line[256];
    p->v.elapsed_s = now - p->t0;
    kvctl_progress_render(&p->v, line, sizeof line);
    p->v.frame++;
    p->last = now;
    if (p->tty) {
        /* Back to the line's start, the new text, then erase what a longer one left. */
        fprintf(p->f, "\r%s\033[K%s", line, p->v.finished ? "\n" : "");
    } else {
        fprintf(p->f, "%s\n", line);
    }
    fflush(p->f);
}

void kvctl_progress_start(kvctl_progress *p, FILE *f, bool on, const char *label, const char *unit,
                          uint64_t total)
{
    memset(p, 0, sizeof *p);
    p->on = on;
    if (!on)
        return;
    p->f = f;
    p->tty = isatty(fileno(f)) == 1;
    pthread_mutex_init(&p->mu, NULL); /* default attributes: cannot fail on Linux */
    p->v = (kvctl_progress_view){.label = label, .unit = unit, .total = total};
    p->t0 = now_s();
    pthread_mutex_lock(&p->mu);
    draw_locked(p, p->t0);
    pthread_mutex_unlock(&p->mu);
}

void kvctl_progress_set(kvctl_progress *p, uint64_t done, uint64_t total)
{
    if (!p->on)
        return;
    double now = now_s();
    pthread_mutex_lock(&p->mu);
    p->v.done = done;
    if (total)
        p->v.total = total;
    if (now - p->last >= (p->tty ? TTY_EVERY : LINE_EVERY))
        draw_locked(p, now);
    pthread_mutex_unlock(&p->mu);
}

void kvctl_progress_finish(kvctl_progress *p, uint64_t done, uint64_t total)
{
    if (!p->on)
        return;
    pthread_mutex_lock(&p->mu);
    p->v.done = done;
    p->v.total = total;
    p->v.finished = true;
    draw_locked(p, now_s());
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_destroy(&p->mu);
    p->on = false;
}

void kvctl_progress_stop(kvctl_progress *p)
{
    if (!p->on)
        return;
    pthread_mutex_lock(&p->mu);
    uint64_t done = p->v.done, total = p->v.total;
    pthread_mutex_unlock(&p->mu);
    kvctl_progress_finish(p, done, total);
}

typedef struct helper {
    kvctl_progress *p;
    void (*poll)(void *arg, uint64_t *done, uint64_t *total);
    void *arg;
    atomic_bool stop;
} helper;

static void *helper_main(void *arg)
{
    helper *h = arg;
    while (!atomic_load(&h->stop)) {
        struct timespec ts = {0, POLL_NS};
        nanosleep(&ts, NULL);
        if (atomic_load(&h->stop))
            break;
        kvctl_progress *p = h->p;
        pthread_mutex_lock(&p->mu);
        uint64_t done = p->v.done, total = 0;
        pthread_mutex_unlock(&p->mu);
        if (h->poll)
            h->poll(h->arg, &done, &total);
        kvctl_progress_set(p, done, total); /* the spinner turns even when nothing moved */
    }
    return NULL;
}

int kvctl_progress_during(kvctl_progress *p, int (*work)(void *arg),
                          void (*poll)(void *arg, uint64_t *done, uint64_t *total), void *arg)
{
    if (!p->on)
        return work(arg);
    helper h = {.p = p, .poll = poll, .arg = arg};
    atomic_init(&h.stop, false);
    pthread_t tid;
    bool started = pthread_create(&tid, NULL, helper_main, &h) == 0;
    int rc = work(arg); /* without the helper, the bar only shows its first and last line */
    if (started) {
        atomic_store(&h.stop, true);
        pthread_join(tid, NULL);
    }
    return rc;
}
