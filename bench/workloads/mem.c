/* mem: page faults and TLB misses. Each round maps a fresh 8 MiB anonymous
 * region, writes one word in every 4 KiB page (each write is a page fault),
 * reads them back and unmaps it; then it does 256 Ki dependent random
 * read-modify-writes over a 64 MiB buffer (far larger than any TLB reach with
 * 4 KiB pages). The 64 MiB buffer is set up before the clock starts.
 * Usage: mem [ROUNDS] */
#include <sys/mman.h>
#include "bench.h"

#define MAP_BYTES (8ul << 20)
#define PAGE 4096ul
#define BUF_WORDS ((64ul << 20) / sizeof(uint64_t))
#define RAND_STEPS (256ul << 10)

static void *map_or_die(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mem: mmap");
        exit(1);
    }
    return p;
}

int main(int argc, char **argv)
{
    long rounds = bench_size(argc, argv, 40);
    uint64_t *buf = map_or_die(BUF_WORDS * sizeof(uint64_t));
    for (size_t i = 0; i < BUF_WORDS; i++)
        buf[i] = i * 0x9e3779b97f4a7c15ULL;

    uint64_t sum = 0, x = 0x243f6a8885a308d3ULL;
    double t0 = bench_start("mem");
    for (long r = 0; r < rounds; r++) {
        volatile uint64_t *m = map_or_die(MAP_BYTES);
        for (size_t off = 0; off < MAP_BYTES; off += PAGE)
            m[off / sizeof(uint64_t)] = (uint64_t)r ^ off;
        uint64_t s = 0;
        for (size_t off = 0; off < MAP_BYTES; off += PAGE)
            s += m[off / sizeof(uint64_t)];
        if (munmap((void *)m, MAP_BYTES) != 0) {
            perror("mem: munmap");
            return 1;
        }
        sum = mix64(sum, s);

        uint64_t acc = 0;
        for (size_t k = 0; k < RAND_STEPS; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            /* Depend on the previous load so accesses cannot overlap freely. */
            size_t idx = (x ^ acc) % BUF_WORDS;
            acc += buf[idx];
            buf[idx] = acc ^ k;
        }
        sum = mix64(sum, acc);
    }
    double t1 = bench_now();
    bench_report("mem", rounds, t1 - t0, sum);
    return 0;
}
