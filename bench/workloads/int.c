/* int: CPU-bound integer work. Each round runs a sieve of Eratosthenes, fills
 * an array with xorshift64, hashes it with FNV-1a and a table CRC-32, sorts it
 * with an in-program quicksort (no libc qsort, so native and guest run the
 * same code) and folds everything into the checksum.
 * Usage: int [ROUNDS] */
#include <string.h>
#include "bench.h"

#define SIEVE_N (1u << 20)
#define ARR_N (1u << 16)

static unsigned char sieve_buf[SIEVE_N];
static uint32_t arr[ARR_N];
static uint32_t crc_table[256];

static uint32_t sieve(void)
{
    memset(sieve_buf, 1, sizeof sieve_buf);
    sieve_buf[0] = sieve_buf[1] = 0;
    for (uint32_t i = 2; i * i < SIEVE_N; i++)
        if (sieve_buf[i])
            for (uint32_t j = i * i; j < SIEVE_N; j += i)
                sieve_buf[j] = 0;
    uint32_t count = 0;
    for (uint32_t i = 0; i < SIEVE_N; i++)
        count += sieve_buf[i];
    return count;
}

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_buf(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void quicksort(uint32_t *a, long lo, long hi)
{
    while (lo < hi) {
        uint32_t pivot = a[lo + (hi - lo) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot)
                i++;
            while (a[j] > pivot)
                j--;
            if (i <= j) {
                uint32_t t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        /* Recurse into the smaller half to bound the stack depth. */
        if (j - lo < hi - i) {
            quicksort(a, lo, j);
            lo = i;
        } else {
            quicksort(a, i, hi);
            hi = j;
        }
    }
}

int main(int argc, char **argv)
{
    long rounds = bench_size(argc, argv, 16);
    crc_init();
    uint64_t sum = 0;
    double t0 = bench_start("int");
    for (long r = 0; r < rounds; r++) {
        sum = mix64(sum, sieve());
        uint64_t x = 0x2545f4914f6cdd1dULL ^ (uint64_t)(r + 1);
        for (uint32_t i = 0; i < ARR_N; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            arr[i] = (uint32_t)(x >> 16);
        }
        sum = mix64(sum, fnv1a((const unsigned char *)arr, sizeof arr));
        sum = mix64(sum, crc32_buf((const unsigned char *)arr, sizeof arr));
        quicksort(arr, 0, ARR_N - 1);
        uint64_t s = 0;
        for (uint32_t i = 1; i < ARR_N; i++) {
            if (arr[i - 1] > arr[i]) {
                fprintf(stderr, "int: sort failed at %u\n", i);
                return 1;
            }
            s += (uint64_t)arr[i] * i;
        }
        sum = mix64(sum, s);
    }
    double t1 = bench_now();
    bench_report("int", rounds, t1 - t0, sum);
    return 0;
}
