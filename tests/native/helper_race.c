/* The native kernel's helper-thread protocol (helper_acquire, run_jobs, helper_release) driven from C, for
 * ThreadSanitizer (scripts/sanitize_native.sh builds and runs it): TSan cannot be preloaded into an uninstrumented
 * Python, so this program includes the kernel's source and is instrumented whole. Each call splits a job into two
 * halves that write disjoint slices, and its caller checks both after run_jobs: a missing happens-before edge
 * between a half and its caller is a data race that TSan reports (as it does with the caller's wait for the
 * helper's half taken out). A second thread calls meanwhile, so that ownership of the helper is contended, and
 * the main thread pauses now and then past SPIN_NS, so that the helper also sleeps and is woken. */
#include "_occupancy_native.c"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define ROUNDS 8000 /* per caller: about 1 s under TSan */

typedef struct { int *data; int from, to, value; } Half;

static void fill(void *arg) {
    Half *h = arg;
    for (int i = h->from; i < h->to; i++) h->data[i] = h->value + i;
}

/* Another thread that calls meanwhile: it runs alone, or owns the helper when the main thread does not. */
static void *second_caller(void *unused) {
    (void)unused;
    int data[64];
    for (int round = 0; round < ROUNDS; round++) {
        Half halves[2] = {{data, 0, 32, round}, {data, 32, 64, round}};
        int split = helper_acquire();
        run_jobs(split, fill, halves, sizeof(Half));
        if (!split) fill(&halves[1]);
        if (split) helper_release();
        for (int i = 0; i < 64; i++)
            if (data[i] != round + i) { printf("second caller: wrong value\n"); exit(1); }
    }
    return NULL;
}

int main(void) {
    pthread_t other;
    pthread_create(&other, NULL, second_caller, NULL);
    int data[1024];
    for (int round = 0; round < ROUNDS; round++) {
        Half halves[2] = {{data, 0, 512, round}, {data, 512, 1024, -round}};
        int split = helper_acquire();
        run_jobs(split, fill, halves, sizeof(Half));
        if (!split) fill(&halves[1]);
        if (split) helper_release();
        for (int i = 0; i < 1024; i++)
            if (data[i] != (i < 512 ? round : -round) + i) { printf("wrong value\n"); return 1; }
        if (round % 1000 == 0) usleep(300); /* past SPIN_NS: the helper sleeps on its condition variable */
    }
    pthread_join(other, NULL);
    if (atomic_load(&helper.on_helper) == 0) { /* nothing ran on the helper: the run tested nothing */
        printf("the helper ran no half\n");
        return 1;
    }
    printf("ok: helper ran %llu halves, callers took back %llu\n", (unsigned long long)atomic_load(&helper.on_helper),
           (unsigned long long)atomic_load(&helper.taken_back));
    return 0;
}
