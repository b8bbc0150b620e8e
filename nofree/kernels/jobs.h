/* Thread helpers shared by nofree's native kernels (included by each source of the library). */
#ifndef NOFREE_JOBS_H
#define NOFREE_JOBS_H

#include <pthread.h>
#include <stdint.h>

#define MAX_THREADS 64

/* How many threads to use: n_threads, at most one per `items` and at most MAX_THREADS. */
static inline int64_t thread_count(int64_t n_threads, int64_t items) {
    if (n_threads > items) n_threads = items;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    return n_threads < 1 ? 1 : n_threads;
}

/* Runs fn on each of the n jobs (job t at jobs + t * size): job 0 on this thread, the others on
 * new ones, or on this one afterwards when a thread cannot be started. */
static inline void run_jobs(void *(*fn)(void *), void *jobs, size_t size, int64_t n) {
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < n; t++)
        started[t] = pthread_create(&tid[t], NULL, fn, (char *)jobs + t * size) == 0;
    fn(jobs);
    for (int64_t t = 1; t < n; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else fn((char *)jobs + t * size);
    }
}

#endif
