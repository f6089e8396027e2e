/* Post-processing of one batch of point sets on the CPU in a few passes over plain arrays.
 *
 * The same function as models/postprocess.py's torch path (``occupied_labels``): points far from their
 * query centre or with no class score above the threshold are dropped, the rest are averaged per voxel,
 * and (optionally) the 3x3x3 closing of the class-score volume fills holes. The torch path runs about
 * sixty small tensor ops per frame, and their dispatch costs more than the arithmetic on a 2-core CPU;
 * here each step is one loop. Results are bit-identical to the torch path on x86-64 (tests compare
 * them): the same float32 operations in the same order, built with -ffp-contract=off. A caller that leaves a
 * core idle meanwhile (the CPU frame loop, one frame at a time) may ask for two threads: each long loop is
 * then split in halves between the calling thread and one persistent helper thread, still bit for bit.
 *
 * Three smaller loops serve the frame's host side: dense_cloud lists the occupied cells of a dense label
 * grid (the fused CUDA path copies the grids to the host) as their PointCloud2 rows, cloud_words writes the
 * rows of listed voxels, and
 * normalise_image turns the CPU preprocessing's resized uint8 planes into the network's input; all run
 * with the GIL released, beside the frame loop's other Python threads. Two short ones do the frame's
 * geometry (rigid_pose: the camera pose's checks; grid_geometry: the grid's placement and grid2img), the
 * Python functions' float64 expressions in their order: about forty Python float operations per frame that
 * cost 0.1 ms right after a wait for the device.
 *
 * Built by setup.py as an optional extension; models/native_postprocess.py loads it and falls back to
 * the torch path when it is missing or out of date.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Bumped whenever the call signature or the semantics change; the Python side checks it. */
#define ABI_VERSION 14

#define NONFINITE_SCORE (-1)
#define OUT_OF_MEMORY (-2)

typedef struct {
    int nx, ny, nz, num_classes, closing;
    float ex, ey, ez;         /* grid extent in metres (points are normalised to [0, 1)) */
    float max_center_dist_sq; /* metres^2 */
    float threshold;
} Params;

typedef struct { int lo[3], hi[3]; } Box; /* inclusive voxel bounds */

static void box_reset(Box *b) {
    for (int a = 0; a < 3; a++) { b->lo[a] = INT32_MAX; b->hi[a] = -1; }
}

static void box_add(Box *b, const int v[3]) {
    for (int a = 0; a < 3; a++) {
        if (v[a] < b->lo[a]) b->lo[a] = v[a];
        if (v[a] > b->hi[a]) b->hi[a] = v[a];
    }
}

/* ``b`` grown by ``margin`` voxels on every side, clipped to the grid. */
static Box box_grow(const Box *b, int margin, const int shape[3]) {
    Box g;
    for (int a = 0; a < 3; a++) {
        g.lo[a] = b->lo[a] - margin < 0 ? 0 : b->lo[a] - margin;
        g.hi[a] = b->hi[a] + margin >= shape[a] ? shape[a] - 1 : b->hi[a] + margin;
    }
    return g;
}

static int64_t box_size(const Box *b, int a) { return (int64_t)b->hi[a] - b->lo[a] + 1; }

#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define MIN2(a, b) ((a) < (b) ? (a) : (b))

#define KEPT 1
#define DROPPED 0
#define KEPT_NONFINITE (-1)

/* The voxel of one point into ``v``: KEPT, DROPPED (beyond the centre distance, best score not above the
 * threshold, or outside the grid; a NaN score drops the point, as torch's amax propagates NaN), or
 * KEPT_NONFINITE (kept with an infinite score, which the torch path handles). Each float32 step is the
 * torch path's, in its order. */
static int point_voxel(const float *pt, const float *center, const float *score, const Params *p, int v[3]) {
    float dx = (pt[0] - center[0]) * p->ex;
    float dy = (pt[1] - center[1]) * p->ey;
    float dz = (pt[2] - center[2]) * p->ez;
    float d2 = dx * dx + dy * dy;
    d2 = d2 + dz * dz;
    if (!(d2 <= p->max_center_dist_sq)) return DROPPED;
    /* branch-free, every score read once, in four running maxima: one would be a chain of dependent
     * comparisons; without NaNs (handled below) the order of a max does not change it */
    float most[4] = {score[0], score[0], score[0], score[0]};
    int finite = 1, c = 0;
    for (; c + 4 <= p->num_classes; c += 4) {
        for (int j = 0; j < 4; j++) {
            float x = score[c + j];
            finite &= fabsf(x) <= FLT_MAX; /* false for NaN and +-inf */
            most[j] = x > most[j] ? x : most[j];
        }
    }
    for (; c < p->num_classes; c++) {
        float x = score[c];
        finite &= fabsf(x) <= FLT_MAX;
        most[0] = x > most[0] ? x : most[0];
    }
    float best = MAX2(MAX2(most[0], most[1]), MAX2(most[2], most[3]));
    if (!finite) { /* rare: a NaN drops the point (torch's amax is NaN), an infinity is left to torch */
        for (int c = 0; c < p->num_classes; c++)
            if (isnan(score[c])) return DROPPED;
    }
    if (!(best > p->threshold)) return DROPPED;
    /* floor(x) in [0, n) exactly when x in [0, n): no floor needed (nor SSE4.1's roundss) */
    float x = pt[0] * (float)p->nx, y = pt[1] * (float)p->ny, z = pt[2] * (float)p->nz;
    if (!(x >= 0.0f && x < (float)p->nx && y >= 0.0f && y < (float)p->ny && z >= 0.0f && z < (float)p->nz))
        return DROPPED;
    v[0] = (int)x; v[1] = (int)y; v[2] = (int)z;
    return finite ? KEPT : KEPT_NONFINITE;
}

/* out[o][i][j] = op over in[o][i-1..i+1][j] for arrays laid out [outer][n][inner]; neighbours beyond the
 * ends are ignored. Each loop runs over as many contiguous elements as it can (the lines are short: 36
 * voxels along z), and there is one copy per op, so that the compiler vectorises them. */
#define DEFINE_PASS(name, T, OP)                                                                               \
    static void name(const T *restrict in, T *restrict out, int64_t outer, int64_t n, int64_t inner) {         \
        if (n == 1) {                                                                                          \
            memcpy(out, in, (size_t)(outer * inner) * sizeof(T));                                             \
            return;                                                                                            \
        }                                                                                                      \
        if (inner == 1) { /* contiguous lines: all of them in one pass, then each line's two ends */           \
            const int64_t total = outer * n;                                                                   \
            for (int64_t i = 1; i < total - 1; i++) out[i] = OP(OP(in[i - 1], in[i + 1]), in[i]);              \
            for (int64_t o = 0; o < total; o += n) {                                                           \
                out[o] = OP(in[o], in[o + 1]);                                                                 \
                out[o + n - 1] = OP(in[o + n - 2], in[o + n - 1]);                                             \
            }                                                                                                  \
            return;                                                                                            \
        }                                                                                                      \
        for (int64_t o = 0; o < outer; o++) {                                                                  \
            const T *restrict v = in + o * n * inner;                                                          \
            T *restrict w = out + o * n * inner;                                                               \
            for (int64_t j = 0; j < inner; j++) w[j] = OP(v[j], v[inner + j]);                                 \
            for (int64_t k = inner; k < (n - 1) * inner; k++)                                                  \
                w[k] = OP(OP(v[k - inner], v[k + inner]), v[k]);                                               \
            for (int64_t j = (n - 1) * inner; j < n * inner; j++) w[j] = OP(v[j - inner], v[j]);               \
        }                                                                                                      \
    }
#define OR2(a, b) ((a) | (b))
#define AND2(a, b) ((a) & (b))
DEFINE_PASS(pass_max, float, MAX2)
DEFINE_PASS(pass_min, float, MIN2)
DEFINE_PASS(words_or, uint64_t, OR2)
DEFINE_PASS(words_and, uint64_t, AND2)
DEFINE_PASS(bytes_or, uint8_t, OR2)

/* out[i] = op of the planes in[0..count-1] at i (count 1 to 3): the x pass of a 3x3x3 filter, plane by
 * plane, one loop per count so that each vectorises. */
#define DEFINE_ACROSS(name, OP)                                                                         \
    static void name(const float *const *in, int count, float *restrict out, int64_t n) {              \
        const float *restrict a = in[0], *restrict b = in[count > 1], *restrict c = in[count - 1];    \
        if (count == 3)                                                                                \
            for (int64_t i = 0; i < n; i++) out[i] = OP(OP(a[i], c[i]), b[i]);                          \
        else if (count == 2)                                                                           \
            for (int64_t i = 0; i < n; i++) out[i] = OP(a[i], b[i]);                                    \
        else                                                                                           \
            memcpy(out, a, (size_t)n * sizeof(float));                                                 \
    }
DEFINE_ACROSS(across_max, MAX2)
DEFINE_ACROSS(across_min, MIN2)

/* Where the occupied voxels go: per voxel its flat id, label 1..C, best score and (x, y, z); and its label
 * in the frame's dense grid (zero on entry). */
typedef struct {
    int64_t *id;
    uint8_t *label;
    float *best;
    int32_t *index; /* (N, 3) */
    uint8_t *dense; /* (X*Y*Z,) this frame's grid */
} Outputs;

static void emit(const Outputs *o, int64_t at, int64_t id_base, int64_t cell, const int v[3], int label, float best) {
    o->id[at] = id_base + cell;
    o->label[at] = (uint8_t)(label + 1);
    o->best[at] = best;
    for (int a = 0; a < 3; a++) o->index[3 * at + a] = v[a];
    o->dense[cell] = (uint8_t)(label + 1);
}

/* Per-thread buffers reused across frames: fresh multi-megabyte allocations would cost page faults
 * every frame (as much time as the filters). Freed when the thread ends. */
typedef struct {
    size_t size; /* bytes */
    void *data;
} Buffer;

enum { POINT_CELL, MARK, RANK, ROW_CELL, ROW_VOXEL, ROW_KEPT, COUNTS, MEAN, PLANES, WINS, BEST, BEST_CLASS,
       PLANE_START, CLASSES, NEEDS, WORDS, KEPT_WORDS,
       /* the helper's half of the closing (the calling thread owns these too) */
       PLANES_B, WINS_B, BEST_B, BEST_CLASS_B, CLASSES_B, WORDS_B,
       /* resize_normalise: the two axes' weights, and each thread's horizontally resized rows */
       RESIZE_WX, RESIZE_WY, RESIZE_ROWS,
       NUM_BUFFERS };

typedef struct { Buffer b[NUM_BUFFERS]; } Scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_destroy(void *ptr) {
    Scratch *s = ptr;
    for (int i = 0; i < NUM_BUFFERS; i++) free(s->b[i].data);
    free(s);
}

static void scratch_make_key(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_destroy) == 0; }

/* This thread's scratch, or NULL when out of memory. Called with the GIL held or not: no Python API. */
static Scratch *thread_scratch(void) {
    pthread_once(&scratch_once, scratch_make_key);
    if (!scratch_key_ok) return NULL;
    Scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (s && pthread_setspecific(scratch_key, s) != 0) { free(s); s = NULL; }
    }
    return s;
}

/* Buffer ``which`` with room for ``count`` items of ``item`` bytes (contents undefined), or NULL. */
static void *scratch_get(Scratch *s, int which, int64_t count, size_t item) {
    size_t need = (size_t)(count > 0 ? count : 1) * item;
    Buffer *b = &s->b[which];
    if (b->size < need) {
        free(b->data);
        b->data = malloc(need);
        b->size = b->data ? need : 0;
    }
    return b->data;
}

/* One helper thread, for a caller that asks for two: the CPU frame loop takes one frame at a time, so its
 * post-processing runs right after the inference, on cores the inference has just left idle. Each of the
 * kernel's long loops is then split in two halves, one on the calling thread and one on the helper, so that
 * every output element is still computed by the same float32 operations in the same order. The helper is
 * one persistent thread made on first use (one made per call would cost more than a split saves): between
 * the halves of one call it spins for up to SPIN_NS, then sleeps on a condition variable. A sleeping helper
 * may take long to start (about 0.5 ms where the OS has halted its idle core), so the second half goes to
 * whichever side claims it first: a caller done with its own half before the helper has started runs the
 * other half too, and a late helper never makes a call slower than one thread. One call at a time owns the
 * helper; a call made meanwhile on another thread runs alone. A fork's child gets a fresh state. */
typedef void (*Job)(void *);

typedef struct {
    pthread_mutex_t lock; /* with ``wake`` / ``done``: sleeping until a job is posted / finished */
    pthread_cond_t wake, done;
    pthread_mutex_t owner; /* held by the call that uses the helper */
    Job job;
    void *arg;
    /* jobs are numbered 1, 2, ...: the last one posted, the last one claimed (by the helper or the caller;
     * every job is claimed before the next is posted) and the last one the helper finished */
    _Atomic uint64_t posted, claimed, finished;
    _Atomic uint64_t on_helper, taken_back; /* second halves the helper ran, and those its caller ran instead */
    int started;
} Helper;

static Helper helper = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
                        PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, 0, 0, 0, 0, 0};

#define SPIN_NS 200000 /* how long a waiting side polls before it sleeps: the serial steps between halves */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Polls until ``(*value == want) == equal`` (true) or SPIN_NS passed (false). */
static int spin_until(_Atomic uint64_t *value, uint64_t want, int equal) {
    const int64_t until = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        if ((atomic_load_explicit(value, memory_order_acquire) == want) == equal) return 1;
        if (!(i & 63) && now_ns() > until) return 0;
        CPU_RELAX();
    }
}

/* Sleeps until ``(*value == want) == equal`` (changed under ``helper.lock``, with ``cond`` signalled). */
static void sleep_until(_Atomic uint64_t *value, uint64_t want, int equal, pthread_cond_t *cond) {
    if (spin_until(value, want, equal)) return;
    pthread_mutex_lock(&helper.lock);
    while ((atomic_load(value) == want) != equal) pthread_cond_wait(cond, &helper.lock);
    pthread_mutex_unlock(&helper.lock);
}

static void set_and_signal(_Atomic uint64_t *value, uint64_t to, pthread_cond_t *cond) {
    pthread_mutex_lock(&helper.lock);
    atomic_store(value, to);
    pthread_cond_signal(cond);
    pthread_mutex_unlock(&helper.lock);
}

/* True when this side claims job ``n`` (the one after ``n - 1``, which is claimed by now). */
static int claim(uint64_t n) {
    uint64_t before = n - 1;
    return atomic_compare_exchange_strong(&helper.claimed, &before, n);
}

static void *helper_main(void *start) {
    for (uint64_t seen = (uint64_t)(uintptr_t)start;;) {
        sleep_until(&helper.posted, seen, 0, &helper.wake);
        seen = atomic_load(&helper.posted); /* the newest: the caller may have claimed several meanwhile */
        if (!claim(seen)) continue;         /* the caller ran it; its job and arg may already be the next's */
        atomic_fetch_add_explicit(&helper.on_helper, 1, memory_order_relaxed);
        helper.job(helper.arg);
        set_and_signal(&helper.finished, seen, &helper.done);
    }
    return NULL;
}

static void helper_after_fork(void) { /* the child has no helper thread, and may have inherited held locks */
    pthread_mutex_init(&helper.lock, NULL);
    pthread_mutex_init(&helper.owner, NULL);
    pthread_cond_init(&helper.wake, NULL);
    pthread_cond_init(&helper.done, NULL);
    atomic_store(&helper.posted, 0);
    atomic_store(&helper.claimed, 0);
    atomic_store(&helper.finished, 0);
    atomic_store(&helper.on_helper, 0); /* helper_counts: since this process started */
    atomic_store(&helper.taken_back, 0);
    helper.started = 0;
}

/* True when this call owns the helper (made now if need be); ``helper_release`` gives it back. */
static int helper_acquire(void) {
    if (pthread_mutex_trylock(&helper.owner) != 0) return 0;
    if (!helper.started) {
        pthread_attr_t attr;
        pthread_t thread;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        void *start = (void *)(uintptr_t)atomic_load(&helper.posted);
        helper.started = pthread_create(&thread, &attr, helper_main, start) == 0;
        pthread_attr_destroy(&attr);
        if (!helper.started) {
            pthread_mutex_unlock(&helper.owner);
            return 0;
        }
    }
    return 1;
}

static void helper_release(void) { pthread_mutex_unlock(&helper.owner); }

/* ``job`` on ``jobs[0]`` here and, when ``split`` (the helper is this call's), on ``jobs[1]`` on the helper, or
 * here too when the helper has not started it by the time ``jobs[0]`` is done. A caller that does not split
 * gives ``jobs[0]`` the whole range. */
static void run_jobs(int split, Job job, void *jobs, size_t size) {
    if (!split) {
        job(jobs);
        return;
    }
    helper.job = job;
    helper.arg = (char *)jobs + size;
    const uint64_t n = atomic_load(&helper.posted) + 1;
    set_and_signal(&helper.posted, n, &helper.wake);
    job(jobs);
    if (claim(n)) { /* the helper is still waking up */
        atomic_fetch_add_explicit(&helper.taken_back, 1, memory_order_relaxed);
        job((char *)jobs + size);
    } else
        sleep_until(&helper.finished, n, 1, &helper.done);
}

/* The first index from ``i`` on whose byte is not zero (``n`` when there is none): occupied voxels are
 * few, so the empty runs are skipped eight bytes at a time. */
static int64_t next_nonzero(const uint8_t *v, int64_t i, int64_t n) {
    for (; i < n && (i & 7); i++)
        if (v[i]) return i;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, v + i, 8);
        if (word) break;
    }
    for (; i < n; i++)
        if (v[i]) return i;
    return n;
}

typedef struct { int v[3]; } Voxel;

/* The boxes the closing crops to: of each class's voxels above the threshold, and of all of them. */
typedef struct {
    Box box[256], above;
} Boxes;

static void boxes_reset(Boxes *b, int C) {
    box_reset(&b->above);
    for (int c = 0; c < C; c++) box_reset(&b->box[c]);
}

static void box_merge(Box *into, const Box *from) {
    for (int a = 0; a < 3; a++) {
        into->lo[a] = MIN2(into->lo[a], from->lo[a]);
        into->hi[a] = MAX2(into->hi[a], from->hi[a]);
    }
}

static void boxes_merge(Boxes *into, const Boxes *from, int C) {
    box_merge(&into->above, &from->above);
    for (int c = 0; c < C; c++) box_merge(&into->box[c], &from->box[c]);
}

/* ``best_class`` of a voxel no class has won yet */
#define NO_CLASS 0xFF

/* The points of the queries this job takes: each one's voxel in ``cell`` (-1: dropped), and how many it kept.
 * The queries go in chunks from a counter both halves share, so a helper that starts late takes fewer. */
#define QUERY_CHUNK 8

typedef struct {
    const float *pts, *centers, *scores;
    const Params *p;
    int64_t nq, nr;
    _Atomic int64_t *next; /* the first query no job has taken */
    int32_t *cell;
    int64_t kept;
    int nonfinite; /* a kept point has a non-finite score: the frame goes to the torch path */
} Classify;

static void classify_points(void *arg) {
    Classify *j = arg;
    const Params *p = j->p;
    j->kept = 0;
    j->nonfinite = 0;
    for (int64_t q0; (q0 = atomic_fetch_add(j->next, QUERY_CHUNK)) < j->nq;) {
        for (int64_t q = q0; q < MIN2(q0 + QUERY_CHUNK, j->nq); q++) {
            for (int64_t r = 0; r < j->nr; r++) {
                const int64_t i = q * j->nr + r;
                int v[3];
                const int state = point_voxel(j->pts + 3 * i, j->centers + 3 * q, j->scores + p->num_classes * i, p, v);
                if (state == KEPT_NONFINITE) {
                    j->nonfinite = 1;
                    return;
                }
                j->cell[i] = state == KEPT ? (v[0] * p->ny + v[1]) * p->nz + v[2] : -1;
                j->kept += state == KEPT;
            }
        }
    }
}

/* Sums and means of the voxels ranked [k0, k1): each voxel's points added in point order, as torch's
 * index_add_ adds them. */
typedef struct {
    const int32_t *cell, *rank;
    const float *scores;
    int64_t n;
    int C;
    int32_t k0, k1;
    int32_t *counts;
    float *mean;
    /* for the closing (``boxes`` NULL without it): which of these rows have a class above ``threshold``, and
     * their boxes */
    const Voxel *row_voxel;
    float threshold;
    uint8_t *row_kept;
    Boxes *boxes;
} Sums;

/* ``row_kept`` and the boxes of rows [k0, k1), from their means. */
static void rows_above(const Sums *j) {
    const int C = j->C;
    boxes_reset(j->boxes, C);
    for (int64_t row = j->k0; row < j->k1; row++) {
        j->row_kept[row] = 0;
        for (int c = 0; c < C; c++) {
            if (!(j->mean[row * C + c] > j->threshold)) continue;
            box_add(&j->boxes->box[c], j->row_voxel[row].v);
            j->row_kept[row] = 1;
        }
        if (j->row_kept[row]) box_add(&j->boxes->above, j->row_voxel[row].v);
    }
}

static void voxel_sums(void *arg) {
    const Sums *j = arg;
    const int C = j->C;
    memset(j->counts + j->k0, 0, (size_t)(j->k1 - j->k0) * sizeof(int32_t));
    memset(j->mean + (int64_t)j->k0 * C, 0, (size_t)((int64_t)(j->k1 - j->k0) * C) * sizeof(float));
    for (int64_t i = 0; i < j->n; i++) {
        if (j->cell[i] < 0) continue;
        const int32_t k = j->rank[j->cell[i]];
        if (k < j->k0 || k >= j->k1) continue;
        j->counts[k]++;
        float *acc = j->mean + (int64_t)k * C;
        const float *sc = j->scores + C * i;
        for (int c = 0; c < C; c++) acc[c] += sc[c];
    }
    for (int64_t k = j->k0; k < j->k1; k++) {
        const float count = (float)j->counts[k];
        for (int c = 0; c < C; c++) j->mean[k * C + c] /= count;
    }
    if (j->boxes) rows_above(j);
}

/* Voxel means of the kept points: rows sorted by voxel, in ``s``'s ROW_CELL / ROW_VOXEL / MEAN buffers; with
 * ``boxes`` (the closing) also ROW_KEPT and the boxes. ``split``: the point and sum loops in halves, one on the
 * helper. Returns M, or a negative code. */
static int64_t voxel_means(const float *pts, const float *centers, const float *scores, int64_t nq, int64_t nr,
                           const Params *p, Scratch *s, int split, Boxes *boxes) {
    const int C = p->num_classes;
    const int64_t n = nq * nr, cells = (int64_t)p->nx * p->ny * p->nz;
    int32_t *cell = scratch_get(s, POINT_CELL, n, sizeof(int32_t)); /* the point's voxel, -1 dropped */
    uint8_t *mark = scratch_get(s, MARK, cells, 1);
    if (!cell || !mark) return OUT_OF_MEMORY;
    _Atomic int64_t next = 0;
    Classify halves[2];
    for (int h = 0; h < 2; h++) halves[h] = (Classify){pts, centers, scores, p, nq, nr, &next, cell, 0, 0};
    run_jobs(split, classify_points, halves, sizeof(Classify)); /* without the helper, halves[1] stays zero */
    if (halves[0].nonfinite || halves[1].nonfinite) return NONFINITE_SCORE;
    const int64_t kept = halves[0].kept + halves[1].kept;
    if (kept == 0) return 0;
    memset(mark, 0, (size_t)cells);
    for (int64_t i = 0; i < n; i++)
        if (cell[i] >= 0) mark[cell[i]] = 1;
    /* number the marked voxels in the grid's order */
    int32_t *rank = scratch_get(s, RANK, cells, sizeof(int32_t)); /* set at marked voxels only */
    int64_t *row_cell = scratch_get(s, ROW_CELL, kept, sizeof(int64_t)); /* kept >= M */
    Voxel *row_voxel = scratch_get(s, ROW_VOXEL, kept, sizeof(Voxel));
    if (!rank || !row_cell || !row_voxel) return OUT_OF_MEMORY;
    int64_t m = 0;
    for (int64_t id = next_nonzero(mark, 0, cells); id < cells; id = next_nonzero(mark, id + 1, cells)) {
        const int64_t column = id / p->nz;
        rank[id] = (int32_t)m;
        row_cell[m] = id;
        row_voxel[m] = (Voxel){{(int)(column / p->ny), (int)(column % p->ny), (int)(id % p->nz)}};
        m++;
    }
    int32_t *counts = scratch_get(s, COUNTS, m, sizeof(int32_t));
    float *mean = scratch_get(s, MEAN, m * C, sizeof(float));
    if (!counts || !mean) return OUT_OF_MEMORY;
    uint8_t *row_kept = boxes ? scratch_get(s, ROW_KEPT, m, 1) : NULL;
    if (boxes && !row_kept) return OUT_OF_MEMORY;
    Boxes second; /* the helper's half's boxes */
    Sums sums[2];
    for (int h = 0; h < 2; h++)
        sums[h] = (Sums){cell, rank, scores, n, C, split ? (int32_t)(h * (m / 2)) : 0,
                         (int32_t)(split && !h ? m / 2 : m), counts, mean, row_voxel, p->threshold, row_kept,
                         boxes && h ? &second : boxes};
    run_jobs(split, voxel_sums, sums, sizeof(Sums));
    if (boxes && split) boxes_merge(boxes, &second, C);
    return m;
}

/* First index of the largest of ``n`` values. */
static int argmax(const float *v, int n) {
    int best = 0;
    for (int c = 1; c < n; c++)
        if (v[c] > v[best]) best = c;
    return best;
}

/* Where ``closed`` beats ``best`` (initialised to the threshold; strictly: a tie keeps the lower class),
 * take its value and class ``c``. Two branch-free loops the compiler vectorises: most voxels are not
 * filled, and a branch per voxel mispredicts on the rest. */
static void fill_line(const float *restrict closed, float *restrict best, uint8_t *restrict best_class,
                      uint8_t *restrict wins, int64_t n, uint8_t c) {
    for (int64_t k = 0; k < n; k++) {
        wins[k] = closed[k] > best[k];
        best[k] = MAX2(closed[k], best[k]);
    }
    for (int64_t k = 0; k < n; k++) best_class[k] = wins[k] ? c : best_class[k];
}

/* The rows (x, y) of each stage of one class's closing that the fill reads, from the closing of its
 * above-threshold bits (``class_needs``): the fill reads the closed scores only in rows with a voxel the
 * closing fills (above the threshold after it, not before), and each stage before it only the rows within
 * one of those of the stage after, along x or y. The others are not computed. */
enum { NEED_SZ, NEED_DYZ, NEED_D, NEED_E, NEED_C, NUM_NEEDS };

/* One class's closing, computed one x plane at a time: ten (sy, sz) planes of the class's crop instead of
 * two whole-crop volumes (up to a megabyte each for a class that spans the room), which right after an
 * inference took 5-10 % longer. The y and z passes of each filter run within a plane and its x pass across
 * three planes: the same 3x3x3 max or min over the crop, in another order (exact: they do not round). */
typedef struct {
    int c;
    Box crop, own;
    int64_t sx, sy, sz, plane;
    float *dilated[3], *eroded[3]; /* (sy, sz) planes filtered along y and z, kept for x % 3 */
    int dilated_x[3], eroded_x[3]; /* which x each holds (-1: none) */
    float *scores, *work, *across, *closed; /* (sy, sz) each */
    uint8_t *need[NUM_NEEDS];               /* (sx, sy) each, crop-local: row (x, y) of the stage is computed */
} ClassPlanes;

#define PLANES_PER_CLASS 10

/* The class's planes from ``memory`` (PLANES_PER_CLASS * plane floats), none computed yet. */
static void class_planes_place(ClassPlanes *k, float *memory) {
    float **planes[PLANES_PER_CLASS] = {&k->dilated[0], &k->dilated[1], &k->dilated[2], &k->eroded[0],
                                        &k->eroded[1], &k->eroded[2], &k->scores, &k->work, &k->across, &k->closed};
    for (int i = 0; i < PLANES_PER_CLASS; i++) *planes[i] = memory + i * k->plane;
    for (int i = 0; i < 3; i++) k->dilated_x[i] = k->eroded_x[i] = -1;
}

static void class_planes_init(ClassPlanes *k, int c, const Box *box, const int shape[3], float *memory,
                              uint8_t *need_memory) {
    k->c = c;
    k->crop = box_grow(box, 2, shape);
    k->own = box_grow(box, 1, shape);
    k->sx = box_size(&k->crop, 0);
    k->sy = box_size(&k->crop, 1);
    k->sz = box_size(&k->crop, 2);
    k->plane = k->sy * k->sz;
    class_planes_place(k, memory);
    for (int i = 0; i < NUM_NEEDS; i++) k->need[i] = need_memory + i * k->sx * k->sy;
}

/* What a closing over one frame's voxel means reads: rows in the grid's order, and where each x plane's
 * rows start. */
typedef struct {
    const Params *p;
    const float *mean;
    const Voxel *row_voxel;
    const int64_t *plane_start; /* (nx + 1,) */
} Rows;

/* Whether the closing's bits can be packed one z column to a word (the stages' rows are then found), and
 * scores at or below the threshold can stand as 0 (``dilated_yz``). */
static int masks_usable(const Params *p) { return p->nz <= 64 && p->threshold >= 0.0f; }

/* Bits crop.lo[2] .. crop.hi[2] of a z column word. */
static uint64_t z_bits(const Box *crop) {
    return (~0ULL >> (63 - (crop->hi[2] - crop->lo[2]))) << crop->lo[2];
}

/* ``k->need`` from the 3x3x3 closing of the class's above-threshold bits over the crop, one uint64 per z
 * column (``words``: two (sx, sy) scratch arrays). Max and min commute with the threshold, and the filters'
 * scores are 0 or above it, so a closed score is above the threshold exactly where the closed bit is set.
 * ``kept``: the (nx, ny) words of the voxels with any class above the threshold, which keep their own
 * labels; NULL when the masks are not usable, and then every row is computed. */
static void class_needs(ClassPlanes *k, const Rows *r, const uint64_t *kept, uint64_t *words) {
    const int64_t sx = k->sx, sy = k->sy, columns = sx * sy;
    uint8_t **need = k->need;
    if (!kept) {
        for (int i = 0; i < NUM_NEEDS; i++) memset(need[i], 1, (size_t)columns);
        return;
    }
    const Params *p = r->p;
    const Box *crop = &k->crop, *own = &k->own;
    uint64_t *bits = words, *tmp = words + columns;
    memset(bits, 0, (size_t)columns * sizeof(uint64_t));
    for (int x = crop->lo[0]; x <= crop->hi[0]; x++) {
        for (int64_t row = r->plane_start[x]; row < r->plane_start[x + 1]; row++) {
            if (!(r->mean[row * p->num_classes + k->c] > p->threshold)) continue;
            const int *v = r->row_voxel[row].v;
            bits[(int64_t)(x - crop->lo[0]) * sy + (v[1] - crop->lo[1])] |= 1ULL << v[2];
        }
    }
    const uint64_t column_bits = z_bits(crop), lo = 1ULL << crop->lo[2], hi = 1ULL << crop->hi[2];
    for (int64_t i = 0; i < columns; i++) bits[i] = (bits[i] | bits[i] << 1 | bits[i] >> 1) & column_bits;
    words_or(bits, tmp, sx, sy, 1); /* dilation along y, then x */
    words_or(tmp, bits, 1, sx, sy);
    for (int64_t i = 0; i < columns; i++) /* erosion along z: the ends' outer neighbours are ignored */
        bits[i] = bits[i] & (bits[i] << 1 | lo) & (bits[i] >> 1 | hi);
    words_and(bits, tmp, sx, sy, 1); /* erosion along y, then x */
    words_and(tmp, bits, 1, sx, sy);
    const uint64_t own_bits = z_bits(own);
    for (int64_t cx = 0; cx < sx; cx++) {
        const int x = crop->lo[0] + (int)cx;
        for (int64_t cy = 0; cy < sy; cy++) {
            const int y = crop->lo[1] + (int)cy;
            const int inside = x >= own->lo[0] && x <= own->hi[0] && y >= own->lo[1] && y <= own->hi[1];
            const uint64_t filled = bits[cx * sy + cy] & ~kept[(int64_t)x * p->ny + y] & own_bits;
            need[NEED_C][cx * sy + cy] = inside && filled != 0;
        }
    }
    bytes_or(need[NEED_C], need[NEED_E], 1, sx, sy); /* the closing's x pass reads the erosion at x +- 1 */
    bytes_or(need[NEED_E], need[NEED_D], sx, sy, 1); /* the erosion's y pass, the dilation at y +- 1 */
    bytes_or(need[NEED_D], need[NEED_DYZ], 1, sx, sy); /* the dilation's x pass */
    bytes_or(need[NEED_DYZ], need[NEED_SZ], sx, sy, 1); /* its y pass */
}

/* The first index from ``from`` on whose flag is ``value`` (``n`` when there is none). */
static int64_t find_flag(const uint8_t *flags, int64_t from, int64_t n, int value) {
    const uint8_t *at = from < n ? memchr(flags + from, value, (size_t)(n - from)) : NULL;
    return at ? at - flags : n;
}

/* Runs of consecutive needed rows: ``for (EACH_RUN(flags, n, a, b))`` visits each [a, b). One call per run
 * instead of per row keeps the loops long (a row is 11-36 floats). */
#define EACH_RUN(flags, n, a, b) \
    int64_t a = find_flag(flags, 0, n, 1), b = find_flag(flags, a, n, 0); a < (n); \
    a = find_flag(flags, b, n, 1), b = find_flag(flags, a, n, 0)

typedef void (*Pass)(const float *restrict, float *restrict, int64_t, int64_t, int64_t);
typedef void (*Across)(const float *const *, int, float *restrict, int64_t);

/* Rows [a, b) of the y pass of a (sy, sz) plane. It runs over the rows a - 1 .. b that lie in the plane, so
 * rows a - 1 and b of ``out`` get values that no reader uses (each run is whole: they are not needed). */
static void y_pass_rows(Pass pass, const float *in, float *out, int64_t a, int64_t b, int64_t sy, int64_t sz) {
    const int64_t lo = MAX2(a - 1, 0), hi = MIN2(b, sy - 1);
    pass(in + lo * sz, out + lo * sz, 1, hi - lo + 1, sz);
}

/* Rows [a, b) of the x pass over ``count`` (sy, sz) planes. */
static void x_pass_rows(Across across, const float *const *planes, int count, float *out, int64_t a, int64_t b,
                        int64_t sz) {
    const float *rows[3];
    for (int i = 0; i < count; i++) rows[i] = planes[i] + a * sz;
    across(rows, count, out + a * sz, (b - a) * sz);
}

/* This stage's needed rows of plane x (crop-local flags, (sy,)). */
static const uint8_t *needed(const ClassPlanes *k, int stage, int x) {
    return k->need[stage] + (int64_t)(x - k->crop.lo[0]) * k->sy;
}

/* Plane x of the class's scores above the threshold (0 elsewhere: see ``closing``), dilated along y and z. */
static const float *dilated_yz(ClassPlanes *k, const Rows *r, int x) {
    const int slot = x % 3;
    if (k->dilated_x[slot] == x) return k->dilated[slot];
    const int C = r->p->num_classes;
    const int64_t sy = k->sy, sz = k->sz;
    const uint8_t *need_z = needed(k, NEED_SZ, x), *need_y = needed(k, NEED_DYZ, x);
    for (EACH_RUN(need_z, sy, a, b)) memset(k->scores + a * sz, 0, (size_t)((b - a) * sz) * sizeof(float));
    for (int64_t row = r->plane_start[x]; row < r->plane_start[x + 1]; row++) {
        float score = r->mean[row * C + k->c];
        if (!(score > r->p->threshold)) continue; /* every voxel above it lies in the class's box */
        const int *v = r->row_voxel[row].v; /* (a row no stage reads takes it too: harmless) */
        k->scores[(v[1] - k->crop.lo[1]) * sz + (v[2] - k->crop.lo[2])] = score;
    }
    for (EACH_RUN(need_z, sy, a, b)) pass_max(k->scores + a * sz, k->work + a * sz, b - a, sz, 1);
    for (EACH_RUN(need_y, sy, a, b)) y_pass_rows(pass_max, k->work, k->dilated[slot], a, b, sy, sz);
    k->dilated_x[slot] = x;
    return k->dilated[slot];
}

/* The planes x-1, x, x+1 that lie in the crop, through ``get``, into ``planes``; returns how many. */
static int neighbour_planes(ClassPlanes *k, const Rows *r, int x,
                            const float *(*get)(ClassPlanes *, const Rows *, int), const float *planes[3]) {
    int count = 0;
    for (int xx = MAX2(x - 1, k->crop.lo[0]); xx <= MIN2(x + 1, k->crop.hi[0]); xx++) planes[count++] = get(k, r, xx);
    return count;
}

/* Plane x of the dilation, eroded along y and z. */
static const float *eroded_yz(ClassPlanes *k, const Rows *r, int x) {
    const int slot = x % 3;
    if (k->eroded_x[slot] == x) return k->eroded[slot];
    const int64_t sy = k->sy, sz = k->sz;
    const float *planes[3];
    const int count = neighbour_planes(k, r, x, dilated_yz, planes);
    const uint8_t *need_d = needed(k, NEED_D, x), *need_e = needed(k, NEED_E, x);
    for (EACH_RUN(need_d, sy, a, b)) {
        x_pass_rows(across_max, planes, count, k->across, a, b, sz);
        pass_min(k->across + a * sz, k->work + a * sz, b - a, sz, 1);
    }
    for (EACH_RUN(need_e, sy, a, b)) y_pass_rows(pass_min, k->work, k->eroded[slot], a, b, sy, sz);
    k->eroded_x[slot] = x;
    return k->eroded[slot];
}

/* Plane x of the closing, in ``k->closed`` (its needed rows): asked for x in increasing order, each plane
 * above is computed once. */
static const float *closed_plane(ClassPlanes *k, const Rows *r, int x) {
    const float *planes[3];
    const int count = neighbour_planes(k, r, x, eroded_yz, planes);
    const uint8_t *need_c = needed(k, NEED_C, x);
    for (EACH_RUN(need_c, k->sy, a, b)) x_pass_rows(across_min, planes, count, k->closed, a, b, k->sz);
    return k->closed;
}

/* Plane x of the reach (``best``, ``best_class``: (ry, rz)): each class's closed scores where they beat the
 * best so far, classes in ascending order so that a tie keeps the lower one as torch's max does; then the
 * voxels with a class above the threshold keep their own label and score (above it too). */
static void fill_plane(ClassPlanes *classes, int active, const Rows *r, const uint8_t *row_kept, const Box *reach,
                       int x, float *best, uint8_t *best_class, uint8_t *wins) {
    const int C = r->p->num_classes;
    const int64_t ry = box_size(reach, 1), rz = box_size(reach, 2);
    memset(best_class, NO_CLASS, (size_t)(ry * rz));
    for (int64_t i = 0; i < ry * rz; i++) best[i] = r->p->threshold; /* a class fills a voxel by beating it */
    for (int i = 0; i < active; i++) {
        ClassPlanes *k = &classes[i];
        if (x < k->own.lo[0] || x > k->own.hi[0]) continue; /* only voxels within 1 of the box can be filled */
        const uint8_t *need_c = needed(k, NEED_C, x) - k->crop.lo[1]; /* indexed by y */
        if (!memchr(need_c + k->own.lo[1], 1, (size_t)box_size(&k->own, 1))) continue; /* it fills none here */
        const float *closed = closed_plane(k, r, x);
        const int64_t oz = box_size(&k->own, 2);
        for (int y = k->own.lo[1]; y <= k->own.hi[1]; y++) {
            if (!need_c[y]) continue;
            const int64_t at = (int64_t)(y - reach->lo[1]) * rz + (k->own.lo[2] - reach->lo[2]);
            fill_line(closed + (y - k->crop.lo[1]) * k->sz + (k->own.lo[2] - k->crop.lo[2]), best + at,
                      best_class + at, wins, oz, (uint8_t)k->c);
        }
    }
    for (int64_t row = r->plane_start[x]; row < r->plane_start[x + 1]; row++) {
        if (!row_kept[row]) continue;
        const int *v = r->row_voxel[row].v;
        const int64_t at = (int64_t)(v[1] - reach->lo[1]) * rz + (v[2] - reach->lo[2]);
        const int label = argmax(r->mean + row * C, C);
        best[at] = r->mean[row * C + label];
        best_class[at] = (uint8_t)label;
    }
}

/* Writes plane x's occupied voxels (those with a class now) from ``written`` on, in the grid's order;
 * returns the new count. */
static int64_t list_plane(const Params *p, const Box *reach, int x, const float *best, const uint8_t *best_class,
                          int64_t id_base, const Outputs *outputs, int64_t written) {
    const int64_t rz = box_size(reach, 2);
    for (int y = reach->lo[1]; y <= reach->hi[1]; y++) {
        const int64_t at = (int64_t)(y - reach->lo[1]) * rz;
        const int64_t column = ((int64_t)x * p->ny + y) * p->nz;
        const uint8_t *line = best_class + at;
        for (int64_t k = 0; k < rz; k++) {
            if (!(k & 7) && k + 8 <= rz) { /* skip eight empty voxels at a time */
                uint64_t word;
                memcpy(&word, line + k, 8);
                if (word == UINT64_MAX) {
                    k += 7;
                    continue;
                }
            }
            if (line[k] == NO_CLASS) continue;
            const int v[3] = {x, y, reach->lo[2] + (int)k};
            emit(outputs, written++, id_base, column + v[2], v, line[k], best[at + k]);
        }
    }
    return written;
}

/* ``class_needs`` of classes [i0, i1), with scratch ``words`` of their own. */
typedef struct {
    ClassPlanes *classes;
    int i0, i1;
    const Rows *rows;
    const uint64_t *kept;
    uint64_t *words;
} Needs;

static void classes_needs(void *arg) {
    const Needs *j = arg;
    for (int i = j->i0; i < j->i1; i++) class_needs(&j->classes[i], j->rows, j->kept, j->words);
}

/* Planes x0..x1 of the reach filled and their occupied voxels written, from ``out`` on; the classes' plane
 * caches are this range's own. */
typedef struct {
    ClassPlanes *classes;
    int active;
    const Rows *rows;
    const uint8_t *row_kept;
    const Box *reach;
    int x0, x1;
    float *best;
    uint8_t *best_class, *wins;
    int64_t id_base;
    Outputs out;
    int64_t written;
} PlaneRange;

static void close_planes(void *arg) {
    PlaneRange *j = arg;
    j->written = 0;
    for (int x = j->x0; x <= j->x1; x++) {
        fill_plane(j->classes, j->active, j->rows, j->row_kept, j->reach, x, j->best, j->best_class, j->wins);
        j->written = list_plane(j->rows->p, j->reach, x, j->best, j->best_class, j->id_base, &j->out, j->written);
    }
}

/* Work of plane x: its fill and list over the reach's (y, z) area, and each class's filters in the rows of
 * the plane they run in (``class_needs``). */
static int64_t plane_work(const ClassPlanes *classes, int active, const Box *reach, int x) {
    int64_t work = box_size(reach, 1) * box_size(reach, 2);
    for (int i = 0; i < active; i++) {
        const ClassPlanes *k = &classes[i];
        if (x < k->crop.lo[0] || x > k->crop.hi[0]) continue;
        int64_t rows = 0;
        for (int stage = NEED_SZ; stage < NUM_NEEDS; stage++) {
            const uint8_t *need = needed(k, stage, x);
            for (int64_t y = 0; y < k->sy; y++) rows += need[y];
        }
        work += rows * k->sz;
    }
    return work;
}

/* The first plane of the second half of the reach (lo < mid <= hi): about half of the work on each side. */
static int reach_middle(const ClassPlanes *classes, int active, const Box *reach) {
    int64_t total = 0, before = 0;
    for (int x = reach->lo[0]; x <= reach->hi[0]; x++) total += plane_work(classes, active, reach, x);
    int mid = reach->lo[0] + 1;
    for (; mid < reach->hi[0]; mid++) {
        before += plane_work(classes, active, reach, mid - 1);
        if (2 * before >= total) break;
    }
    return mid;
}

/* The first class of the second half: the cut that splits the columns ``class_needs`` goes over most evenly. */
static int classes_middle(const ClassPlanes *classes, int active) {
    int64_t total = 0, before = 0;
    for (int i = 0; i < active; i++) total += classes[i].sx * classes[i].sy;
    int cut = 0;
    int64_t gap = total; /* |first half - second half| at ``cut`` */
    for (int i = 1; i <= active; i++) {
        before += classes[i - 1].sx * classes[i - 1].sy;
        const int64_t d = 2 * before - total;
        if ((d < 0 ? -d : d) < gap) {
            gap = d < 0 ? -d : d;
            cut = i;
        }
    }
    return cut;
}

/* ``o`` advanced by ``at`` voxels (the dense grid is the frame's, unchanged). */
static Outputs outputs_at(const Outputs *o, int64_t at) {
    return (Outputs){o->id + at, o->label + at, o->best + at, o->index + 3 * at, o->dense};
}

/* Moves ``count`` voxels written at ``from`` to ``to`` (< from). */
static void outputs_move(const Outputs *o, int64_t to, int64_t from, int64_t count) {
    memmove(o->id + to, o->id + from, (size_t)count * sizeof(*o->id));
    memmove(o->label + to, o->label + from, (size_t)count);
    memmove(o->best + to, o->best + from, (size_t)count * sizeof(*o->best));
    memmove(o->index + 3 * to, o->index + 3 * from, (size_t)(3 * count) * sizeof(*o->index));
}

/* Closing of the voxel means (see postprocess.close_holes): writes the occupied voxels, ids ascending.
 *
 * Voxels with a class above the threshold keep their own scores; every other voxel is filled when a
 * class's closed score is above the threshold, with the best such class. Only the scores above the
 * threshold matter: a closed score above it is a min of maxima above it, each attained by a score above
 * it, and a class at or below it never wins a voxel whose best class is above. So each class is closed
 * on its own, over the box of its voxels above the threshold grown by 2 (exact: only voxels within 1 of
 * that box can get a closed score above it, and their erosion reads the dilation within 2, which reads
 * nothing else that matters), and the scores at or below the threshold are left out. The classes are
 * closed together, one x plane at a time, in ascending order within a plane, so that a tie keeps the
 * lower class as torch's max does. Within a class's box, the float filters run only in the (x, y) rows the
 * fill reads (``class_needs``), found from the closing of its bits, 64 z voxels to a word: on the frame
 * path benchmark's lite frame the first filter runs over 44 % of the boxes' voxels, the last over 21 %.
 * Returns the number of voxels written, or a code. */
static int64_t closing(int64_t m, const Params *p, Scratch *s, const Boxes *boxes, int64_t id_base,
                       const Outputs *outputs, int split) {
    const int C = p->num_classes;
    const int shape[3] = {p->nx, p->ny, p->nz};
    const float *mean = s->b[MEAN].data;
    const Voxel *row_voxel = s->b[ROW_VOXEL].data;
    const uint8_t *row_kept = s->b[ROW_KEPT].data; /* with the boxes, from ``voxel_means`` */
    const Box *box = boxes->box, above = boxes->above;
    int64_t *plane_start = scratch_get(s, PLANE_START, p->nx + 1, sizeof(int64_t));
    ClassPlanes *classes = scratch_get(s, CLASSES, C, sizeof(ClassPlanes));
    if (!plane_start || !classes) return OUT_OF_MEMORY;
    for (int64_t x = 0, row = 0; x <= p->nx; x++) { /* rows are in the grid's order: x ascending */
        while (row < m && row_voxel[row].v[0] < x) row++;
        plane_start[x] = row;
    }
    if (above.hi[0] < 0) return 0; /* nothing above the threshold: the closing leaves nothing */
    int active = 0;
    int64_t floats = 0, flags = 0, most_columns = 0;
    for (int c = 0; c < C; c++) {
        if (box[c].hi[0] < 0) continue; /* never above the threshold */
        const Box crop = box_grow(&box[c], 2, shape);
        const int64_t columns = box_size(&crop, 0) * box_size(&crop, 1);
        floats += PLANES_PER_CLASS * box_size(&crop, 1) * box_size(&crop, 2);
        flags += NUM_NEEDS * columns;
        most_columns = MAX2(most_columns, columns);
        active++;
    }
    float *memory = scratch_get(s, PLANES, floats, sizeof(float));
    uint8_t *need_memory = scratch_get(s, NEEDS, flags, 1);
    uint64_t *kept = NULL, *words = NULL;
    if (masks_usable(p)) { /* the z columns of the voxels that keep their own labels */
        kept = scratch_get(s, KEPT_WORDS, (int64_t)p->nx * p->ny, sizeof(uint64_t));
        words = scratch_get(s, WORDS, 2 * most_columns, sizeof(uint64_t));
        if (!kept || !words) return OUT_OF_MEMORY;
        memset(kept, 0, (size_t)p->nx * p->ny * sizeof(uint64_t));
        for (int64_t row = 0; row < m; row++) {
            const int *v = row_voxel[row].v;
            if (row_kept[row]) kept[(int64_t)v[0] * p->ny + v[1]] |= 1ULL << v[2];
        }
    }
    const Box reach = box_grow(&above, 1, shape);
    const int64_t ry = box_size(&reach, 1), rz = box_size(&reach, 2);
    float *best = scratch_get(s, BEST, ry * rz, sizeof(float));         /* plane x of the reach */
    uint8_t *best_class = scratch_get(s, BEST_CLASS, ry * rz, 1);
    uint8_t *wins = scratch_get(s, WINS, rz, 1);
    if (!memory || !need_memory || !best || !best_class || !wins) return OUT_OF_MEMORY;
    float *const planes = memory;
    const Rows rows = {p, mean, row_voxel, plane_start};
    for (int c = 0, i = 0; c < C; c++) {
        if (box[c].hi[0] < 0) continue;
        class_planes_init(&classes[i], c, &box[c], shape, memory, need_memory);
        memory += PLANES_PER_CLASS * classes[i].plane;
        need_memory += NUM_NEEDS * classes[i].sx * classes[i].sy;
        i++;
    }
    uint64_t *words_b = split && words ? scratch_get(s, WORDS_B, 2 * most_columns, sizeof(uint64_t)) : NULL;
    if (split && words && !words_b) return OUT_OF_MEMORY;
    const int cut = split ? classes_middle(classes, active) : active;
    Needs needs[2] = {{classes, 0, cut, &rows, kept, words}, {classes, cut, active, &rows, kept, words_b}};
    run_jobs(split, classes_needs, needs, sizeof(Needs));
    /* the reach's planes in two ranges, the second with copies of the classes that keep plane caches of
     * their own (each range recomputes the few planes around the middle that both read) */
    const int halves = split && reach.hi[0] > reach.lo[0];
    const int mid = halves ? reach_middle(classes, active, &reach) : reach.hi[0] + 1;
    PlaneRange ranges[2];
    ranges[0] = (PlaneRange){classes, active, &rows, row_kept, &reach, reach.lo[0], mid - 1, best, best_class, wins,
                             id_base, *outputs, 0};
    const int64_t second_at = (int64_t)(mid - reach.lo[0]) * ry * rz; /* the first range writes fewer voxels */
    if (halves) {
        ClassPlanes *classes_b = scratch_get(s, CLASSES_B, active, sizeof(ClassPlanes));
        float *planes_b = scratch_get(s, PLANES_B, floats, sizeof(float));
        float *best_b = scratch_get(s, BEST_B, ry * rz, sizeof(float));
        uint8_t *best_class_b = scratch_get(s, BEST_CLASS_B, ry * rz, 1);
        uint8_t *wins_b = scratch_get(s, WINS_B, rz, 1);
        if (!classes_b || !planes_b || !best_b || !best_class_b || !wins_b) return OUT_OF_MEMORY;
        for (int i = 0; i < active; i++) {
            classes_b[i] = classes[i];
            class_planes_place(&classes_b[i], planes_b + (classes[i].dilated[0] - planes));
        }
        ranges[1] = (PlaneRange){classes_b, active, &rows, row_kept, &reach, mid, reach.hi[0], best_b, best_class_b,
                                 wins_b, id_base, outputs_at(outputs, second_at), 0};
    }
    run_jobs(halves, close_planes, ranges, sizeof(PlaneRange));
    int64_t written = ranges[0].written;
    if (halves) {
        outputs_move(outputs, written, second_at, ranges[1].written);
        written += ranges[1].written;
    }
    return written;
}

/* One frame: writes its occupied voxels (ids offset by ``id_base``). Returns their number or a code. */
static int64_t frame_labels(const float *pts, const float *centers, const float *scores, int64_t nq, int64_t nr,
                            const Params *p, int64_t id_base, const Outputs *out, int split) {
    Scratch *s = thread_scratch();
    if (!s) return OUT_OF_MEMORY;
    Boxes boxes;
    int64_t m = voxel_means(pts, centers, scores, nq, nr, p, s, split, p->closing ? &boxes : NULL);
    if (m <= 0) return m;
    if (p->closing) return closing(m, p, s, &boxes, id_base, out, split);
    const float *mean = s->b[MEAN].data;
    const int64_t *row_cell = s->b[ROW_CELL].data;
    const Voxel *row_voxel = s->b[ROW_VOXEL].data;
    for (int64_t row = 0; row < m; row++) {
        int label = argmax(mean + row * p->num_classes, p->num_classes);
        emit(out, row, id_base, row_cell[row], row_voxel[row].v, label, mean[row * p->num_classes + label]);
    }
    return m;
}

/* Whether ``b`` holds ``count`` items of ``itemsize`` bytes at an address aligned for them (a numpy view at an odd
 * byte offset is not: the loops read it as float, int32 or double); raises ValueError if not. */
static int check_buffer(const Py_buffer *b, const char *name, Py_ssize_t itemsize, Py_ssize_t count) {
    if (count < 0 || count > PY_SSIZE_T_MAX / itemsize) { /* a size product that overflowed (items_of) */
        PyErr_Format(PyExc_ValueError, "%s: expected more items than a buffer can hold", name);
        return 0;
    }
    if (b->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes (%zd items of %zd), got %zd", name,
                     itemsize * count, count, itemsize, b->len);
        return 0;
    }
    if ((uintptr_t)b->buf % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s: not aligned to its %zd-byte items", name, itemsize);
        return 0;
    }
    return 1;
}

/* a * b * c * d for non-negative sizes, or -1 where the product does not fit (check_buffer then refuses it). */
static Py_ssize_t items_of(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c, Py_ssize_t d) {
    Py_ssize_t ab, abc, abcd;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc) || __builtin_mul_overflow(abc, d, &abcd))
        return -1;
    return abcd;
}

static PyObject *occupied_labels(PyObject *Py_UNUSED(self), PyObject *args) {
    enum { POINTS, CENTERS, SCORES, OUT_ID, OUT_LABEL, OUT_BEST, OUT_INDEX, OUT_DENSE, NUM_ARRAYS };
    Py_buffer buf[NUM_ARRAYS];
    Py_ssize_t nb, nq, nr;
    Params p;
    double ex, ey, ez, max_dist_sq, threshold;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*w*w*nnniiiipdddddi", &buf[POINTS], &buf[CENTERS], &buf[SCORES],
                          &buf[OUT_ID], &buf[OUT_LABEL], &buf[OUT_BEST], &buf[OUT_INDEX], &buf[OUT_DENSE], &nb, &nq,
                          &nr, &p.num_classes, &p.nx, &p.ny, &p.nz, &p.closing, &ex, &ey, &ez, &max_dist_sq,
                          &threshold, &threads))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t cells = items_of(p.nx, p.ny, p.nz, 1);
    if (nb < 0 || nq < 0 || nr < 0 || p.num_classes < 1 || p.num_classes > 255 || p.nx < 1 || p.ny < 1 ||
        p.nz < 1 || cells < 0) {
        PyErr_SetString(PyExc_ValueError, "occupied_labels: bad sizes");
        goto done;
    }
    const Py_ssize_t voxels = items_of(nb, cells, 1, 1);
    if (!check_buffer(&buf[POINTS], "points", 4, items_of(nb, nq, nr, 3)) ||
        !check_buffer(&buf[CENTERS], "centers", 4, items_of(nb, nq, 3, 1)) ||
        !check_buffer(&buf[SCORES], "scores", 4, items_of(nb, nq, nr, p.num_classes)) ||
        !check_buffer(&buf[OUT_ID], "out_id", 8, voxels) || !check_buffer(&buf[OUT_LABEL], "out_label", 1, voxels) ||
        !check_buffer(&buf[OUT_BEST], "out_best", 4, voxels) ||
        !check_buffer(&buf[OUT_INDEX], "out_index", 4, items_of(voxels, 3, 1, 1)) ||
        !check_buffer(&buf[OUT_DENSE], "out_dense", 1, voxels))
        goto done;
    /* the torch path's float32 constants: Python scalars meet float32 tensors as float32 */
    p.ex = (float)ex; p.ey = (float)ey; p.ez = (float)ez;
    p.max_center_dist_sq = (float)max_dist_sq;
    p.threshold = (float)threshold;
    int64_t total = 0, code = 0;
    Py_BEGIN_ALLOW_THREADS
    const int split = threads >= 2 && helper_acquire();
    for (Py_ssize_t b = 0; b < nb && code >= 0; b++) {
        const Outputs out = {(int64_t *)buf[OUT_ID].buf + total, (uint8_t *)buf[OUT_LABEL].buf + total,
                             (float *)buf[OUT_BEST].buf + total, (int32_t *)buf[OUT_INDEX].buf + 3 * total,
                             (uint8_t *)buf[OUT_DENSE].buf + b * cells};
        code = frame_labels((const float *)buf[POINTS].buf + b * nq * nr * 3,
                            (const float *)buf[CENTERS].buf + b * nq * 3,
                            (const float *)buf[SCORES].buf + b * nq * nr * p.num_classes, nq, nr, &p, b * cells, &out,
                            split);
        if (code >= 0) total += code;
    }
    if (split) helper_release();
    Py_END_ALLOW_THREADS
    if (code == OUT_OF_MEMORY)
        PyErr_NoMemory();
    else
        result = PyLong_FromLongLong(code == NONFINITE_SCORE ? -1 : total);
done:
    for (int i = 0; i < NUM_ARRAYS; i++) PyBuffer_Release(&buf[i]);
    return result;
}

/* A voxel's centre as a row of six 4-byte words (x, y, z float32; packed rgb; label as a uint32; score float32),
 * the layout of discene_ros/msg_encode.py's CLOUD_DTYPE. Each coordinate is the float64
 * origin + (index + 0.5) * size of OccupancyFrame.centers_world, rounded to float32 once. Clears ``finite`` unless
 * its x, y and z are finite (PointCloud2's is_dense), ``finite_score`` unless its score is, seen on the way: the
 * node's output check reads them instead of passing over the frame again. */
static inline void cloud_row(const int64_t index[3], uint8_t label, float score, const uint32_t *rgb_bits,
                             const double origin[3], double size, uint32_t *row, int *finite, int *finite_score) {
    for (int a = 0; a < 3; a++) {
        float c = (float)(origin[a] + ((double)index[a] + 0.5) * size);
        *finite &= fabsf(c) <= FLT_MAX; /* false for NaN and +-inf */
        memcpy(&row[a], &c, 4);
    }
    row[3] = rgb_bits[label];
    row[4] = label;
    *finite_score &= fabsf(score) <= FLT_MAX;
    memcpy(&row[5], &score, 4);
}

/* cloud_row for M listed voxels: (M, 3) grid indices, labels and scores. */
static void cloud_rows(const int32_t *index, const uint8_t *label, const float *score, const uint32_t *rgb_bits,
                       const double origin[3], double size, int64_t m, uint32_t *out, int *xyz_finite,
                       int *scores_finite) {
    int finite = 1, finite_score = 1;
    for (int64_t i = 0; i < m; i++) {
        const int64_t at[3] = {index[3 * i], index[3 * i + 1], index[3 * i + 2]};
        cloud_row(at, label[i], score[i], rgb_bits, origin, size, out + 6 * i, &finite, &finite_score);
    }
    *xyz_finite = finite;
    *scores_finite = finite_score;
}

/* The PointCloud2 rows of a dense (nx, ny, nz) label grid's occupied voxels (label != 0) in flat-id order, with their
 * flat ids: models/device_cloud.py's compaction on the host, for grids copied back from the device, in one pass
 * instead of postprocess.frame_from_dense's voxel lists and then cloud_rows. Each row as cloud_row writes it, the score best[id]. Returns
 * the number of rows, or -1 when more than capacity; sets whether every x, y and z of them is finite, and every
 * score. */
static int64_t grid_cloud(const uint8_t *restrict labels, const float *restrict best, const uint32_t *rgb_bits, int nx,
                          int ny, int nz, const double origin[3], double size, int64_t capacity, int32_t *restrict out_id,
                          uint32_t *restrict out_rows, int *xyz_finite, int *scores_finite) {
    int64_t cells = (int64_t)nx * ny * nz, m = 0;
    int finite = 1, finite_score = 1;
    for (int64_t id = next_nonzero(labels, 0, cells); id < cells; id = next_nonzero(labels, id + 1, cells)) {
        if (m == capacity) return -1;
        int64_t column = id / nz;
        const int64_t index[3] = {column / ny, column % ny, id % nz};
        cloud_row(index, labels[id], best[id], rgb_bits, origin, size, out_rows + 6 * m, &finite, &finite_score);
        out_id[m++] = (int32_t)id;
    }
    *xyz_finite = finite;
    *scores_finite = finite_score;
    return m;
}

static PyObject *dense_cloud(PyObject *Py_UNUSED(self), PyObject *args) {
    enum { LABELS, BEST, RGB, OUT_ID, OUT_ROWS, NUM_ARRAYS };
    Py_buffer buf[NUM_ARRAYS];
    int nx, ny, nz;
    Py_ssize_t capacity;
    double origin[3], size;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*iiindddd", &buf[LABELS], &buf[BEST], &buf[RGB], &buf[OUT_ID], &buf[OUT_ROWS],
                          &nx, &ny, &nz, &capacity, &origin[0], &origin[1], &origin[2], &size))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t cells = items_of(nx, ny, nz, 1);
    if (nx < 1 || ny < 1 || nz < 1 || cells < 0 || cells > INT32_MAX || capacity < 0 || capacity > PY_SSIZE_T_MAX / 24) {
        PyErr_SetString(PyExc_ValueError, "dense_cloud: bad grid shape or capacity");
        goto done;
    }
    if (!check_buffer(&buf[LABELS], "labels", 1, cells) || !check_buffer(&buf[BEST], "best", 4, cells) ||
        !check_buffer(&buf[RGB], "rgb_bits", 4, 256) || !check_buffer(&buf[OUT_ID], "out_id", 4, capacity) ||
        !check_buffer(&buf[OUT_ROWS], "out_rows", 4, capacity * 6))
        goto done;
    int64_t m;
    int xyz_finite = 0, scores_finite = 0;
    Py_BEGIN_ALLOW_THREADS
    m = grid_cloud((const uint8_t *)buf[LABELS].buf, (const float *)buf[BEST].buf, (const uint32_t *)buf[RGB].buf, nx,
                   ny, nz, origin, size, capacity, (int32_t *)buf[OUT_ID].buf, (uint32_t *)buf[OUT_ROWS].buf,
                   &xyz_finite, &scores_finite);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(LNN)", (long long)m, PyBool_FromLong(xyz_finite), PyBool_FromLong(scores_finite));
done:
    for (int i = 0; i < NUM_ARRAYS; i++) PyBuffer_Release(&buf[i]);
    return result;
}

static PyObject *cloud_words(PyObject *Py_UNUSED(self), PyObject *args) {
    enum { INDEX, LABEL, SCORE, RGB, OUT, NUM_ARRAYS };
    Py_buffer buf[NUM_ARRAYS];
    Py_ssize_t m;
    double origin[3], size;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*ndddd", &buf[INDEX], &buf[LABEL], &buf[SCORE], &buf[RGB], &buf[OUT], &m,
                          &origin[0], &origin[1], &origin[2], &size))
        return NULL;
    PyObject *result = NULL;
    if (m < 0 || m > PY_SSIZE_T_MAX / 24) {
        PyErr_SetString(PyExc_ValueError, "cloud_words: bad count");
        goto done;
    }
    if (!check_buffer(&buf[INDEX], "index", 4, m * 3) || !check_buffer(&buf[LABEL], "label", 1, m) ||
        !check_buffer(&buf[SCORE], "score", 4, m) || !check_buffer(&buf[RGB], "rgb_bits", 4, 256) ||
        !check_buffer(&buf[OUT], "out", 4, m * 6))
        goto done;
    int xyz_finite, scores_finite;
    Py_BEGIN_ALLOW_THREADS
    cloud_rows((const int32_t *)buf[INDEX].buf, (const uint8_t *)buf[LABEL].buf, (const float *)buf[SCORE].buf,
               (const uint32_t *)buf[RGB].buf, origin, size, m, (uint32_t *)buf[OUT].buf, &xyz_finite, &scores_finite);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(NN)", PyBool_FromLong(xyz_finite), PyBool_FromLong(scores_finite));
done:
    for (int i = 0; i < NUM_ARRAYS; i++) PyBuffer_Release(&buf[i]);
    return result;
}

/* Pixels [from, to) of three uint8 channels -> normalised float32 planes: ``dst[c][i]`` is the byte of channel
 * order[c] times scale[c] plus shift[c], two float32 roundings as torch's mul and add. Channel k of pixel i is at
 * ``in[k * channel_step + i * pixel_step]``: planes (step 1) or interleaved RGB (step 3); inlined with either. */
static inline void normalise_pixels(const uint8_t *restrict in, int64_t channel_step, int64_t pixel_step,
                                    float *const dst[3], int64_t from, int64_t to, const int order[3],
                                    const float scale[3], const float shift[3]) {
    for (int c = 0; c < 3; c++) {
        const uint8_t *src = in + order[c] * channel_step;
        float *restrict out = dst[c];
        const float a = scale[c], b = shift[c];
        for (int64_t i = from; i < to; i++) {
            float v = (float)src[i * pixel_step] * a;
            out[i] = v + b;
        }
    }
}

/* Three resized uint8 planes (3, h, w) -> normalised float32 planes (``normalise_pixels``). One pass instead
 * of three torch ops (the channel reorder, the multiply, the add). */
static void normalise_planes(const uint8_t *restrict in, float *restrict out, int64_t pixels, const int order[3],
                             const float scale[3], const float shift[3]) {
    float *const dst[3] = {out, out + pixels, out + 2 * pixels};
    normalise_pixels(in, pixels, 1, dst, 0, pixels, order, scale, shift);
}

static PyObject *normalise_image(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer in, out;
    Py_ssize_t pixels;
    int order[3];
    float scale[3], shift[3];
    if (!PyArg_ParseTuple(args, "y*w*n(iii)(fff)(fff)", &in, &out, &pixels, &order[0], &order[1], &order[2],
                          &scale[0], &scale[1], &scale[2], &shift[0], &shift[1], &shift[2]))
        return NULL;
    PyObject *result = NULL;
    if (pixels < 0 || pixels > PY_SSIZE_T_MAX / 12 || order[0] < 0 || order[0] > 2 || order[1] < 0 || order[1] > 2 ||
        order[2] < 0 || order[2] > 2) {
        PyErr_SetString(PyExc_ValueError, "normalise_image: bad pixel count or channel order");
        goto done;
    }
    if (!check_buffer(&in, "planes", 1, pixels * 3) || !check_buffer(&out, "out", 4, pixels * 3)) goto done;
    Py_BEGIN_ALLOW_THREADS
    normalise_planes((const uint8_t *)in.buf, (float *)out.buf, pixels, order, scale, shift);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* ---- The CPU preprocessing's antialiased resize ------------------------------------------------------------
 * torch's uint8 antialiased bilinear resize (F.interpolate(..., antialias=True) on a uint8 image, the CPU frame
 * path's since session 10), bit for bit, then normalise_pixels' arithmetic, in one call: the largest step of the
 * CPU preprocessing. AVX2 loops where the CPU has them, plain loops elsewhere. A caller may ask for two threads
 * (the output rows in halves with the helper); the frame loop does not: between frames the helper sleeps, and
 * waking it on an idle core took longer here (about 0.5 ms) than the whole resize on one thread.
 *
 * The arithmetic is torch's (PIL's filter): per axis, double weights of the triangle filter widened by the
 * scale (support = max(scale, 1)), normalised to sum 1, then rounded to int16 with as many fraction bits as
 * keep the largest below 2^15; each output value is (2^(bits-1) + sum of weight * byte) >> bits, clamped to
 * 0..255. The horizontal pass runs first into uint8 rows, then the vertical pass. Both are exact integer
 * arithmetic, so any order of the sums and any split of the rows gives the same bytes. */

typedef struct {
    int out, taps;   /* outputs, weights per output (even: the AVX2 loops take them in pairs; zeros pad) */
    int bits;        /* fraction bits of the int16 weights */
    int32_t *first;  /* (out,) first input index of each output */
    int32_t *count;  /* (out,) weights from the first that are not all zero after them, rounded up to even */
    int16_t *weight; /* (out, taps) */
} AxisWeights;

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* The weights of one axis, resized from ``in`` to ``out`` samples; ``memory`` holds AXIS_DOUBLES(in, out)
 * doubles (the int16 table reuses it). */
#define AXIS_TAPS(in, out) ((int)ceil((double)(in) / (out) > 1.0 ? (double)(in) / (out) : 1.0) * 2 + 2)
#define AXIS_DOUBLES(in, out) ((int64_t)(out) * (AXIS_TAPS(in, out) + 1) + 1)

static void axis_weights(int in, int out, double *memory, AxisWeights *a) {
    const double scale = (double)in / out;
    const double support = scale >= 1.0 ? scale : 1.0; /* bilinear: half of 2 taps, widened by the scale */
    const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
    const int most = (int)ceil(support) * 2 + 1; /* torch's bound on the taps of one output */
    const int taps = most + (most & 1);
    double *w = memory;
    int32_t *first = (int32_t *)(memory + (int64_t)out * taps), *count = first + out;
    double largest = 0.0;
    for (int i = 0; i < out; i++) {
        const double center = scale * (i + 0.5);
        int64_t lo = (int64_t)(center - support + 0.5);
        if (lo < 0) lo = 0;
        int64_t hi = (int64_t)(center + support + 0.5);
        if (hi > in) hi = in;
        int64_t size = hi - lo;
        if (size < 0) size = 0;
        if (size > most) size = most;
        double *wi = w + (int64_t)i * taps, total = 0.0;
        for (int64_t j = 0; j < size; j++) {
            wi[j] = triangle(((double)(j + lo) - center + 0.5) * invscale);
            total += wi[j];
        }
        for (int64_t j = 0; j < size; j++) {
            if (total != 0.0) wi[j] /= total;
            if (wi[j] > largest) largest = wi[j];
        }
        for (int64_t j = size; j < taps; j++) wi[j] = 0.0;
        /* the padding taps read real bytes (times zero): keep them inside the row */
        first[i] = (int32_t)(lo + taps <= in ? lo : (in - taps > 0 ? in - taps : 0));
        if (first[i] != lo) { /* shift the weights right by the same amount */
            const int64_t by = lo - first[i];
            for (int64_t j = taps - 1; j >= 0; j--) wi[j] = j >= by ? wi[j - by] : 0.0;
        }
        int used = taps;
        while (used > 0 && wi[used - 1] == 0.0) used--;
        count[i] = used + (used & 1);
    }
    int bits = 0;
    for (bits = 0; bits < 22; bits++)
        if ((int)(0.5 + largest * (1 << (bits + 1))) >= (1 << 15)) break;
    int16_t *w16 = (int16_t *)memory; /* in place: each int16 is written below the doubles still to read */
    for (int64_t k = 0; k < (int64_t)out * taps; k++) {
        const double v = w[k] * (1 << bits);
        w16[k] = (int16_t)(v < 0 ? (int)(-0.5 + v) : (int)(0.5 + v));
    }
    a->out = out;
    a->taps = taps;
    a->bits = bits;
    a->weight = w16;
    a->first = first;
    a->count = count;
}

static inline uint8_t clamp_byte(int32_t v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* One row's horizontal pass: ``in`` (w_in RGB pixels) -> ``out`` (ax->out RGB pixels). */
static void horizontal_row(const uint8_t *restrict in, uint8_t *restrict out, const AxisWeights *ax) {
    const int32_t round = 1 << (ax->bits - 1);
    for (int x = 0; x < ax->out; x++) {
        const uint8_t *p = in + 3 * (int64_t)ax->first[x];
        const int16_t *w = ax->weight + (int64_t)x * ax->taps;
        int32_t r = round, g = round, b = round;
        for (int k = 0; k < ax->count[x]; k++, p += 3) {
            r += w[k] * p[0];
            g += w[k] * p[1];
            b += w[k] * p[2];
        }
        out[3 * x] = clamp_byte(r >> ax->bits);
        out[3 * x + 1] = clamp_byte(g >> ax->bits);
        out[3 * x + 2] = clamp_byte(b >> ax->bits);
    }
}

/* One output row of the vertical pass: ``rows[k]`` are the taps' input rows (``bytes`` each). */
static void vertical_row(const uint8_t *const *rows, const int16_t *w, int taps, int bits, uint8_t *restrict out,
                         int64_t from, int64_t bytes) {
    const int32_t round = 1 << (bits - 1);
    for (int64_t i = from; i < bytes; i++) {
        int32_t v = round;
        for (int k = 0; k < taps; k++) v += w[k] * rows[k][i];
        out[i] = clamp_byte(v >> bits);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* The sums of one output pixel for two rows (one per lane) from their bytes at ``p0`` / ``p1``. */
__attribute__((target("avx2"))) static inline __m256i horizontal_sums(const uint8_t *p0, const uint8_t *p1,
                                                                      const int16_t *w, int n, __m256i sum) {
    /* taps k, k+1 from bytes 0..5 of a load, taps k+2, k+3 from bytes 6..11 */
    const __m256i pair0 = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
                                           0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1);
    const __m256i pair1 = _mm256_setr_epi8(6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1,
                                           6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
    int k = 0;
    for (; k + 4 <= n; k += 4, p0 += 12, p1 += 12) {
        int32_t wa, wb;
        memcpy(&wa, w + k, 4);
        memcpy(&wb, w + k + 2, 4);
        const __m256i v = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)p1), _mm_loadu_si128((const __m128i *)p0));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_shuffle_epi8(v, pair0), _mm256_set1_epi32(wa)));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_shuffle_epi8(v, pair1), _mm256_set1_epi32(wb)));
    }
    if (k < n) {
        int32_t wa;
        memcpy(&wa, w + k, 4);
        const __m256i v = _mm256_set_m128i(_mm_loadl_epi64((const __m128i *)p1), _mm_loadl_epi64((const __m128i *)p0));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_shuffle_epi8(v, pair0), _mm256_set1_epi32(wa)));
    }
    return sum;
}

/* Four rows' horizontal pass at once, two per 256-bit register (one per lane): for each pair of taps the two
 * pixels' bytes become int16 pairs (R0 R1 G0 G1 B0 B1 0 0) and one madd adds both taps' products per channel;
 * one 16-byte load serves four taps. A row's loads end at most 4 bytes past it, which the caller keeps inside
 * the buffer. Each pixel is stored as 4 bytes, the 4th overwritten by the next pixel (the last: 3 bytes). */
__attribute__((target("avx2"))) static void horizontal_rows_avx2(const uint8_t *const in[4], uint8_t *const out[4],
                                                                   const AxisWeights *ax) {
    const __m256i round = _mm256_set1_epi32(1 << (ax->bits - 1));
    const __m128i shift = _mm_cvtsi32_si128(ax->bits);
    for (int x = 0; x < ax->out; x++) {
        const int64_t at = 3 * (int64_t)ax->first[x];
        const int16_t *w = ax->weight + (int64_t)x * ax->taps;
        const int n = ax->count[x];
        __m256i s01 = horizontal_sums(in[0] + at, in[1] + at, w, n, round);
        __m256i s23 = horizontal_sums(in[2] + at, in[3] + at, w, n, round);
        s01 = _mm256_sra_epi32(s01, shift);
        s23 = _mm256_sra_epi32(s23, shift);
        /* lanes: rows 0 | 1 and 2 | 3 as R G B 0 R G B 0 int16, then bytes (rows 0, 2 | 1, 3) */
        const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(s01, s23), _mm256_setzero_si256());
        const uint64_t lo = (uint64_t)_mm_cvtsi128_si64(_mm256_castsi256_si128(bytes));
        const uint64_t hi = (uint64_t)_mm_cvtsi128_si64(_mm256_extracti128_si256(bytes, 1));
        const uint32_t px[4] = {(uint32_t)lo, (uint32_t)hi, (uint32_t)(lo >> 32), (uint32_t)(hi >> 32)};
        if (x + 1 < ax->out)
            for (int r = 0; r < 4; r++) memcpy(out[r] + 3 * x, &px[r], 4);
        else
            for (int r = 0; r < 4; r++) memcpy(out[r] + 3 * x, &px[r], 3);
    }
}

/* One output row of the vertical pass, 16 bytes at a time: byte i of rows k and k+1 interleaved as int16
 * pairs, one madd per pair of taps. Returns how many bytes it wrote (the rest: ``vertical_row``). */
__attribute__((target("avx2"))) static int64_t vertical_row_avx2(const uint8_t *const *rows, const int16_t *w,
                                                                 int taps, int bits, uint8_t *out, int64_t bytes) {
    const __m256i round = _mm256_set1_epi32(1 << (bits - 1));
    const __m128i shift = _mm_cvtsi32_si128(bits);
    int64_t i = 0;
    for (; i + 16 <= bytes; i += 16) {
        __m256i lo = round, hi = round;
        for (int k = 0; k < taps; k += 2) {
            int32_t wk;
            memcpy(&wk, w + k, 4);
            const __m256i wpair = _mm256_set1_epi32(wk);
            const __m128i a = _mm_loadu_si128((const __m128i *)(rows[k] + i));
            const __m128i b = _mm_loadu_si128((const __m128i *)(rows[k + 1] + i));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)), wpair));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)), wpair));
        }
        lo = _mm256_sra_epi32(lo, shift); /* bytes 0..7 */
        hi = _mm256_sra_epi32(hi, shift); /* bytes 8..15 */
        const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
    }
    return i;
}

/* normalise_pixels' arithmetic on one resized RGB row (``pixels`` pixels), 4 pixels at a time: channel
 * order[c]'s bytes picked by a shuffle, converted, multiplied and added as the scalar loop does (no fused
 * multiply-add: two roundings). Returns how many pixels it wrote (the rest: the scalar loop). */
__attribute__((target("avx2"))) static int64_t normalise_row_avx2(const uint8_t *line, int64_t pixels,
                                                                  float *const dst[3], const int order[3],
                                                                  const float scale[3], const float shift[3]) {
    int64_t x = 0;
    for (int c = 0; c < 3; c++) {
        const int o = order[c];
        const __m128i pick = _mm_setr_epi8((char)o, -1, -1, -1, (char)(o + 3), -1, -1, -1, (char)(o + 6), -1, -1,
                                           -1, (char)(o + 9), -1, -1, -1);
        const __m128 a = _mm_set1_ps(scale[c]), b = _mm_set1_ps(shift[c]);
        for (x = 0; x + 6 <= pixels; x += 4) { /* a 16-byte load from pixel x: 4 bytes past pixel x+3 */
            const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(line + 3 * x)), pick);
            _mm_storeu_ps(dst[c] + x, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(v), a), b));
        }
    }
    return x;
}

/* AVX2 where the CPU has it, unless DISCENE_NATIVE_SIMD=0 (the scalar loops other CPUs run; tests compare). */
static int use_avx2(void) {
    static _Atomic int known = -1;
    if (known < 0) {
        const char *env = getenv("DISCENE_NATIVE_SIMD");
        known = __builtin_cpu_supports("avx2") && !(env && strcmp(env, "0") == 0) ? 1 : 0;
    }
    return known;
}
#else
#define HAVE_AVX2_PATH 0
static int use_avx2(void) { return 0; }
#endif

#define MAX_RESIZE_TAPS 128 /* per output: a downscale by up to 63x (the Python side checks) */

typedef struct {
    const uint8_t *in;   /* (in_h, in_w, 3) bytes, rows contiguous */
    const uint8_t *end;  /* one past the input's last byte */
    int64_t in_w;
    const AxisWeights *ax, *ay;
    float *out;          /* (3, ay->out, ax->out) */
    int order[3];
    float scale[3], shift[3];
    int y0, y1;          /* this half's output rows */
    int avx2, ok;
} ResizeJob;

/* Output rows y0..y1 of one job: the horizontal pass of the input rows they read (a few rows around the split
 * are done by both halves), then the vertical pass and the normalisation, a row at a time. */
static void resize_rows(void *arg) {
    ResizeJob *j = arg;
    j->ok = 1;
    if (j->y0 >= j->y1) return;
    const AxisWeights *ax = j->ax, *ay = j->ay;
    const int64_t row_in = 3 * j->in_w, row_out = 3 * (int64_t)ax->out, plane = (int64_t)ay->out * ax->out;
    const int r0 = ay->first[j->y0], r1 = ay->first[j->y1 - 1] + ay->taps; /* input rows read */
    Scratch *s = thread_scratch();
    uint8_t *rows = s ? scratch_get(s, RESIZE_ROWS, (int64_t)(r1 - r0 + 1) * row_out, 1) : NULL;
    if (!rows) {
        j->ok = 0;
        return;
    }
    uint8_t *line = rows + (int64_t)(r1 - r0) * row_out; /* one resized row before its normalisation */
    int r = r0;
#if HAVE_AVX2_PATH
    /* four rows' loads end at most 4 bytes past the fourth */
    for (; j->avx2 && r + 3 < r1 && j->in + (r + 4) * row_in + 4 <= j->end; r += 4) {
        const uint8_t *const src[4] = {j->in + r * row_in, j->in + (r + 1) * row_in, j->in + (r + 2) * row_in,
                                       j->in + (r + 3) * row_in};
        uint8_t *const dst[4] = {rows + (r - r0) * row_out, rows + (r + 1 - r0) * row_out,
                                 rows + (r + 2 - r0) * row_out, rows + (r + 3 - r0) * row_out};
        horizontal_rows_avx2(src, dst, ax);
    }
#endif
    for (; r < r1; r++) horizontal_row(j->in + r * row_in, rows + (r - r0) * row_out, ax);
    const uint8_t *taps[MAX_RESIZE_TAPS];
    for (int y = j->y0; y < j->y1; y++) {
        const int16_t *w = ay->weight + (int64_t)y * ay->taps;
        const int n = ay->count[y];
        for (int k = 0; k < n; k++) taps[k] = rows + (int64_t)(ay->first[y] + k - r0) * row_out;
        int64_t done = 0;
#if HAVE_AVX2_PATH
        if (j->avx2) done = vertical_row_avx2(taps, w, n, ay->bits, line, row_out);
#endif
        vertical_row(taps, w, n, ay->bits, line, done, row_out);
        float *const dst[3] = {j->out + (int64_t)y * ax->out, j->out + plane + (int64_t)y * ax->out,
                               j->out + 2 * plane + (int64_t)y * ax->out};
        int64_t from = 0;
#if HAVE_AVX2_PATH
        if (j->avx2) from = normalise_row_avx2(line, ax->out, dst, j->order, j->scale, j->shift);
#endif
        normalise_pixels(line, 1, 3, dst, from, ax->out, j->order, j->scale, j->shift);
    }
}

static PyObject *resize_normalise(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer in, out;
    Py_ssize_t in_h, in_w, out_h, out_w;
    int order[3], threads;
    float scale[3], shift[3];
    if (!PyArg_ParseTuple(args, "y*w*nnnn(iii)(fff)(fff)i", &in, &out, &in_h, &in_w, &out_h, &out_w, &order[0],
                          &order[1], &order[2], &scale[0], &scale[1], &scale[2], &shift[0], &shift[1], &shift[2],
                          &threads))
        return NULL;
    PyObject *result = NULL;
    if (in_h < 1 || in_w < 1 || out_h < 1 || out_w < 1 || in_h > INT32_MAX / 4 || in_w > INT32_MAX / 4 ||
        out_h > INT32_MAX / 4 || out_w > INT32_MAX / 4 || order[0] < 0 || order[0] > 2 || order[1] < 0 ||
        order[1] > 2 || order[2] < 0 || order[2] > 2) {
        PyErr_SetString(PyExc_ValueError, "resize_normalise: sizes or channel order out of range");
        goto done;
    }
    if (AXIS_TAPS(in_w, out_w) > in_w || AXIS_TAPS(in_h, out_h) > in_h || AXIS_TAPS(in_h, out_h) > MAX_RESIZE_TAPS) {
        result = Py_NewRef(Py_False); /* an image smaller than a filter, or a downscale beyond 63x: torch's */
        goto done;
    }
    if (!check_buffer(&in, "image", 1, in_h * in_w * 3) || !check_buffer(&out, "out", 4, out_h * out_w * 3)) goto done;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    Scratch *s = thread_scratch();
    double *mx = s ? scratch_get(s, RESIZE_WX, AXIS_DOUBLES(in_w, out_w), sizeof(double)) : NULL;
    double *my = s ? scratch_get(s, RESIZE_WY, AXIS_DOUBLES(in_h, out_h), sizeof(double)) : NULL;
    if (mx && my) {
        AxisWeights ax, ay;
        axis_weights((int)in_w, (int)out_w, mx, &ax);
        axis_weights((int)in_h, (int)out_h, my, &ay);
        const int split = threads >= 2 && out_h >= 2 && helper_acquire();
        ResizeJob jobs[2];
        for (int h = 0; h < 2; h++) {
            jobs[h] = (ResizeJob){(const uint8_t *)in.buf, (const uint8_t *)in.buf + in_h * in_w * 3, in_w, &ax, &ay,
                                  (float *)out.buf, {order[0], order[1], order[2]}, {scale[0], scale[1], scale[2]},
                                  {shift[0], shift[1], shift[2]}, 0, (int)out_h, use_avx2(), 0};
        }
        if (split) jobs[0].y1 = jobs[1].y0 = (int)(out_h / 2);
        run_jobs(split, resize_rows, jobs, sizeof(ResizeJob));
        if (split) helper_release();
        ok = jobs[0].ok && (!split || jobs[1].ok);
    }
    Py_END_ALLOW_THREADS
    if (!ok)
        PyErr_NoMemory();
    else
        result = Py_NewRef(Py_True);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* The verdict of discene_ros/msg_decode.py's check_pose on a row-major 4x4 float64 pose: finite, bottom row
 * within 1e-9 of [0 0 0 1], every entry of R^T R - I and det R - 1 within ``tol`` (the same float64 expressions
 * in the same order, so the same verdict), and |t| below ``max_translation``. 1: rigid. 0: not, or |t| too close
 * to the limit to tell without Python's hypot; the caller's Python checks then decide (and say what is wrong). */
static int pose_is_rigid(const double m[16], double tol, double max_translation) {
    for (int j = 0; j < 16; j++)
        if (!isfinite(m[j])) return 0;
    const double bottom[4] = {0.0, 0.0, 0.0, 1.0};
    for (int j = 0; j < 4; j++)
        if (fabs(m[12 + j] - bottom[j]) > 1e-9) return 0;
    const double a = m[0], b = m[1], c = m[2], d = m[4], e = m[5], f = m[6], g = m[8], h = m[9], i = m[10];
    const double cols[3][3] = {{a, d, g}, {b, e, h}, {c, f, i}};
    double ortho = 0.0;
    for (int j = 0; j < 3; j++) {
        for (int k = 0; k < 3; k++) {
            double dot = cols[j][0] * cols[k][0] + cols[j][1] * cols[k][1] + cols[j][2] * cols[k][2];
            double off = fabs(dot - (j == k ? 1.0 : 0.0));
            if (off > ortho) ortho = off;
        }
    }
    double det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g);
    if (ortho > tol || fabs(det - 1.0) > tol) return 0;
    double margin = 0.999 * max_translation; /* below it, |t| <= max_translation whatever the rounding */
    return m[3] * m[3] + m[7] * m[7] + m[11] * m[11] < margin * margin;
}

static PyObject *rigid_pose(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer pose;
    double tol, max_translation;
    if (!PyArg_ParseTuple(args, "y*dd", &pose, &tol, &max_translation)) return NULL;
    PyObject *result = NULL;
    if (check_buffer(&pose, "pose", 8, 16)) result = PyBool_FromLong(pose_is_rigid((const double *)pose.buf, tol,
                                                                                   max_translation));
    PyBuffer_Release(&pose);
    return result;
}

typedef struct {
    int src_h, src_w, dst_h, dst_w; /* the image's size, and the network input's that K is scaled to */
    int shape[3];                   /* voxels along x, y, z */
    double size, floor_z, forward;  /* voxel size, the grid's bottom and the placement's forward distance, metres */
} GridParams;

/* models/preprocess.py's grid geometry of one frame from the row-major 3x3 K and 4x4 camera->world pose (float64):
 * the grid's origin (``origin_in`` when given, else geometry.place_grid's rule) and grid2img (row-major 4x4),
 * K scaled by geometry.scale_intrinsic and the matrix by geometry.grid_to_image_matrix's affine branch, each
 * float64 expression as there, in its order. 1: done. 0 where Python decides (and raises where it is wrong): a
 * non-finite input or origin, a non-positive focal length, a projective pose, a singular rotation. */
static int frame_grid(const double k[9], const double m[16], const double *origin_in, const GridParams *p,
                      double origin[3], double g2i[16]) {
    for (int j = 0; j < 9; j++)
        if (!isfinite(k[j])) return 0;
    for (int j = 0; j < 16; j++)
        if (!isfinite(m[j])) return 0;
    if (!(k[0] > 0.0 && k[4] > 0.0) || p->src_h < 1 || p->src_w < 1) return 0;
    if (m[12] != 0.0 || m[13] != 0.0 || m[14] != 0.0 || m[15] != 1.0) return 0; /* numpy's general inverse */
    if (origin_in) {
        memcpy(origin, origin_in, 3 * sizeof(double));
    } else { /* the horizontal viewing direction, else the image's up, else world x */
        double fx = m[2], fy = m[6];
        double norm = sqrt(fx * fx + fy * fy);
        if (norm < 1e-6) {
            fx = -m[1];
            fy = -m[5];
            norm = sqrt(fx * fx + fy * fy);
        }
        if (norm < 1e-6) {
            fx = 1.0;
            fy = 0.0;
            norm = 1.0;
        }
        double center_x = m[3] + p->forward * (fx / norm), center_y = m[7] + p->forward * (fy / norm);
        origin[0] = center_x - (double)p->shape[0] * p->size / 2;
        origin[1] = center_y - (double)p->shape[1] * p->size / 2;
        origin[2] = p->floor_z;
    }
    if (!(isfinite(origin[0]) && isfinite(origin[1]) && isfinite(origin[2]))) return 0;
    const double sy = (double)p->dst_h / (double)p->src_h, sx = (double)p->dst_w / (double)p->src_w;
    const double ks[3][3] = {{k[0] * sx, k[1] * sx, k[2] * sx}, {k[3] * sy, k[4] * sy, k[5] * sy}, {k[6], k[7], k[8]}};
    const double a = m[0], b = m[1], c = m[2], tx = m[3], d = m[4], e = m[5], f = m[6], ty = m[7];
    const double g = m[8], h = m[9], i = m[10], tz = m[11];
    const double adj[3][3] = {{e * i - f * h, c * h - b * i, b * f - c * e},
                              {f * g - d * i, a * i - c * g, c * d - a * f},
                              {d * h - e * g, b * g - a * h, a * e - b * d}};
    const double det = a * adj[0][0] + b * adj[1][0] + c * adj[2][0];
    if (det == 0.0) return 0;
    const double px = origin[0] - tx, py = origin[1] - ty, pz = origin[2] - tz;
    double cam[3][4];
    for (int r = 0; r < 3; r++) {
        cam[r][0] = adj[r][0] / det;
        cam[r][1] = adj[r][1] / det;
        cam[r][2] = adj[r][2] / det;
        cam[r][3] = (adj[r][0] * px + adj[r][1] * py + adj[r][2] * pz) / det;
    }
    const double scale[4] = {(double)p->shape[0] * p->size, (double)p->shape[1] * p->size,
                             (double)p->shape[2] * p->size, 1.0};
    for (int r = 0; r < 3; r++)
        for (int j = 0; j < 4; j++)
            g2i[4 * r + j] = (ks[r][0] * cam[0][j] + ks[r][1] * cam[1][j] + ks[r][2] * cam[2][j]) * scale[j];
    g2i[12] = g2i[13] = g2i[14] = 0.0;
    g2i[15] = 1.0;
    return 1;
}

static PyObject *grid_geometry(PyObject *Py_UNUSED(self), PyObject *args) {
    enum { K, POSE, ORIGIN_IN, OUT_ORIGIN, OUT_G2I, NUM_ARRAYS };
    Py_buffer buf[NUM_ARRAYS];
    GridParams p;
    int place;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*piiii(iii)ddd", &buf[K], &buf[POSE], &buf[ORIGIN_IN], &buf[OUT_ORIGIN],
                          &buf[OUT_G2I], &place, &p.src_h, &p.src_w, &p.dst_h, &p.dst_w, &p.shape[0], &p.shape[1],
                          &p.shape[2], &p.size, &p.floor_z, &p.forward))
        return NULL;
    PyObject *result = NULL;
    if (check_buffer(&buf[K], "k", 8, 9) && check_buffer(&buf[POSE], "pose", 8, 16) &&
        check_buffer(&buf[ORIGIN_IN], "origin_in", 8, 3) && check_buffer(&buf[OUT_ORIGIN], "out_origin", 8, 3) &&
        check_buffer(&buf[OUT_G2I], "out_g2i", 8, 16))
        result = PyBool_FromLong(frame_grid((const double *)buf[K].buf, (const double *)buf[POSE].buf,
                                            place ? NULL : (const double *)buf[ORIGIN_IN].buf, &p,
                                            (double *)buf[OUT_ORIGIN].buf, (double *)buf[OUT_G2I].buf));
    for (int j = 0; j < NUM_ARRAYS; j++) PyBuffer_Release(&buf[j]);
    return result;
}

static PyObject *helper_counts(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
    return Py_BuildValue("(KK)", (unsigned long long)atomic_load(&helper.on_helper),
                         (unsigned long long)atomic_load(&helper.taken_back));
}

static PyMethodDef methods[] = {
    {"occupied_labels", occupied_labels, METH_VARARGS,
     "occupied_labels(points, centers, scores, out_id, out_label, out_best, out_index, out_dense, B, Q, R, C, "
     "nx, ny, nz, closing, ex, ey, ez, max_center_dist_sq, threshold, threads) -> number of occupied voxels "
     "written, or -1 when a kept point has a non-finite score (use the torch path). out_dense must be zero. "
     "threads 2: the loops split in halves with a helper thread (results unchanged, bit for bit)."},
    {"normalise_image", normalise_image, METH_VARARGS,
     "normalise_image(planes, out, pixels, order, scale, shift): (3, h, w) uint8 -> (3, h, w) float32, "
     "plane c = planes[order[c]] * scale[c] + shift[c]."},
    {"resize_normalise", resize_normalise, METH_VARARGS,
     "resize_normalise(image, out, in_h, in_w, out_h, out_w, order, scale, shift, threads) -> True, or False for "
     "sizes it does not take: (in_h, in_w, 3) uint8 -> (3, out_h, out_w) float32, torch's uint8 antialiased "
     "bilinear resize bit for bit, then plane c = channel order[c] * scale[c] + shift[c]. threads 2: the rows in "
     "halves with the helper thread."},
    {"helper_counts", helper_counts, METH_NOARGS,
     "helper_counts() -> (second halves the helper thread ran, second halves their caller ran because the helper "
     "had not started them), since the process started: how often the helper comes late."},
    {"cloud_words", cloud_words, METH_VARARGS,
     "cloud_words(index, label, score, rgb_bits, out, M, ox, oy, oz, size): M rows of six 4-byte words "
     "(x, y, z, rgb, label, score), centres origin + (index + 0.5) * size rounded to float32; returns "
     "(every x, y and z finite, every score finite)."},
    {"dense_cloud", dense_cloud, METH_VARARGS,
     "dense_cloud(labels, best, rgb_bits, out_id, out_rows, nx, ny, nz, capacity, ox, oy, oz, size) -> (M, every x, y "
     "and z finite, every score finite): the occupied (label != 0) voxels of the grid in flat-id order as int32 ids and PointCloud2 rows "
     "(cloud_words' layout, score best[id]); M -1 when more than capacity."},
    {"rigid_pose", rigid_pose, METH_VARARGS,
     "rigid_pose(pose, tol, max_translation) -> True when the row-major 4x4 float64 pose passes msg_decode.check_pose "
     "(False: not, or too close to the translation limit to tell; check it in Python)."},
    {"grid_geometry", grid_geometry, METH_VARARGS,
     "grid_geometry(k, pose, origin_in, out_origin, out_g2i, place, src_h, src_w, dst_h, dst_w, (nx, ny, nz), size, "
     "floor_z, forward) -> True with the grid's origin (origin_in, or placed when place) and grid2img written (float64), "
     "False where the Python geometry decides."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_occupancy_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, helper_after_fork); }

PyMODINIT_FUNC PyInit__occupancy_native(void) {
    pthread_once(&fork_once, register_fork_handler);
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddIntConstant(mod, "ABI_VERSION", ABI_VERSION) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
