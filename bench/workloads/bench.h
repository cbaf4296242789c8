/* Shared helpers for the Matryoshka CPU benchmark workloads.
 *
 * Each workload times only its work with CLOCK_MONOTONIC and prints exactly
 * one result line, `BENCH name=<n> seconds=<s> checksum=<hex> size=<n>`,
 * which bench/cpu_bench.py parses (after a `BENCH-T0` line at the start). The checksum depends only on the work
 * done (never on timing, pids or addresses), so a run under emulation must
 * print the same checksum as the native run of the same size. */
#ifndef BENCH_H
#define BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double bench_now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        perror("clock_gettime");
        exit(2);
    }
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Work size from argv[1] (a positive integer), or the default. */
static inline long bench_size(int argc, char **argv, long dflt)
{
    if (argc < 2)
        return dflt;
    char *end;
    long v = strtol(argv[1], &end, 10);
    if (*argv[1] == '\0' || *end != '\0' || v <= 0) {
        fprintf(stderr, "usage: %s [SIZE>0]\n", argv[0]);
        exit(2);
    }
    return v;
}

/* Marks the start of the timed work: prints `BENCH-T0 name=<n>` (the host
 * timestamps it to cross-check the guest clock) and returns the start time. */
static inline double bench_start(const char *name)
{
    printf("BENCH-T0 name=%s\n", name);
    fflush(stdout);
    return bench_now();
}

static inline void bench_report(const char *name, long size, double secs, uint64_t checksum)
{
    printf("BENCH name=%s seconds=%.6f checksum=%016llx size=%ld\n", name, secs,
           (unsigned long long)checksum, size);
    fflush(stdout);
}

static inline uint64_t mix64(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

#endif
