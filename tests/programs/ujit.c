/* A user-space JIT in miniature, run inside the guest by tests/guest_jit.rs:
 * code generated at run time, called often enough to be translated, then
 * rewritten while translations of it exist. Every call's result is checked.
 *
 * 1. rwx:    one RWX page; a function's immediate is rewritten between rounds.
 * 2. alias:  a memfd mapped twice, written through the RW view and run through
 *            the RX view (the dual mapping real JITs use): the write reaches
 *            the code through another linear address.
 * 3. self:   a function that stores its argument into the immediate of its own
 *            next instruction, then runs it (x86 makes such a store visible to
 *            the very next instruction).
 * 4. wx:     W^X by mprotect: RW to write, RX to run, for each rewrite.
 * 5. grow:   more and more functions appended to one page while the earlier
 *            ones run (the page's code is rewritten around live translations).
 *
 * Prints "UJIT-OK calls=N" and exits 0, or "UJIT-FAIL ..." and exits 1. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef uint32_t (*fn_t)(uint32_t);

#define CALLS 2000 /* per round: far above the translator's threshold */
#define ROUNDS 40

static unsigned long calls;

static void fail(const char *part, int round, uint32_t got, uint32_t want)
{
    printf("UJIT-FAIL part=%s round=%d got=%#x want=%#x\n", part, round, got, want);
    exit(1);
}

static uint8_t *map(int prot, int flags, int fd, const char *what)
{
    void *p = mmap(NULL, 4096, prot, flags, fd, 0);
    if (p == MAP_FAILED) {
        printf("UJIT-FAIL mmap %s\n", what);
        exit(1);
    }
    return p;
}

#define RWX (PROT_READ | PROT_WRITE | PROT_EXEC)
#define ANON (MAP_PRIVATE | MAP_ANONYMOUS)

/* mov eax, imm32; add eax, edi; ret */
static size_t emit_add_imm(uint8_t *p, uint32_t imm)
{
    p[0] = 0xb8;
    memcpy(p + 1, &imm, 4);
    p[5] = 0x01; /* add eax, edi */
    p[6] = 0xf8;
    p[7] = 0xc3;
    return 8;
}

/* Calls f(i) for i < CALLS; each must return imm + i. */
static void check(const char *part, int round, fn_t f, uint32_t imm)
{
    for (uint32_t i = 0; i < CALLS; i++) {
        uint32_t got = f(i);
        if (got != imm + i)
            fail(part, round, got, imm + i);
    }
    calls += CALLS;
}

static void part_rwx(void)
{
    uint8_t *page = map(RWX, ANON, -1, "rwx");
    for (int r = 0; r < ROUNDS; r++) {
        uint32_t imm = 0x1000u * (uint32_t)r + 7;
        emit_add_imm(page, imm);
        check("rwx", r, (fn_t)page, imm);
    }
    munmap(page, 4096);
}

static void part_alias(void)
{
    int fd = memfd_create("ujit", 0);
    if (fd < 0 || ftruncate(fd, 4096) != 0) {
        printf("UJIT-FAIL memfd\n");
        exit(1);
    }
    uint8_t *rw = map(PROT_READ | PROT_WRITE, MAP_SHARED, fd, "alias rw");
    uint8_t *rx = map(PROT_READ | PROT_EXEC, MAP_SHARED, fd, "alias rx");
    for (int r = 0; r < ROUNDS; r++) {
        uint32_t imm = 0xa0000u + 0x111u * (uint32_t)r;
        emit_add_imm(rw + 64, imm);
        check("alias", r, (fn_t)(rx + 64), imm);
    }
    munmap(rw, 4096);
    munmap(rx, 4096);
    close(fd);
}

static void part_self(void)
{
    uint8_t *page = map(RWX, ANON, -1, "self");
    /* mov [rip+1], edi   (89 3D 01 00 00 00: the next instruction's imm32)
     * mov eax, 0         (B8 00 00 00 00)
     * ret                (C3)                                            */
    static const uint8_t code[] = {0x89, 0x3d, 0x01, 0x00, 0x00, 0x00, 0xb8,
                                   0x00, 0x00, 0x00, 0x00, 0xc3};
    memcpy(page, code, sizeof code);
    fn_t f = (fn_t)page;
    for (int r = 0; r < ROUNDS; r++) {
        for (uint32_t i = 0; i < CALLS / 4; i++) {
            uint32_t v = 0x5000000u + 0x10000u * (uint32_t)r + i;
            uint32_t got = f(v);
            if (got != v)
                fail("self", r, got, v);
        }
        calls += CALLS / 4;
    }
    munmap(page, 4096);
}

static void part_wx(void)
{
    uint8_t *page = map(PROT_READ | PROT_WRITE, ANON, -1, "wx");
    for (int r = 0; r < ROUNDS; r++) {
        uint32_t imm = 0x300000u + 3u * (uint32_t)r;
        if (mprotect(page, 4096, PROT_READ | PROT_WRITE) != 0)
            fail("wx-mprotect-rw", r, 0, 0);
        emit_add_imm(page + 128, imm);
        if (mprotect(page, 4096, PROT_READ | PROT_EXEC) != 0)
            fail("wx-mprotect-rx", r, 0, 0);
        check("wx", r, (fn_t)(page + 128), imm);
    }
    munmap(page, 4096);
}

static void part_grow(void)
{
    uint8_t *page = map(RWX, ANON, -1, "grow");
    enum { N = 64 };
    fn_t fns[N];
    for (int k = 0; k < N; k++) {
        fns[k] = (fn_t)(page + 16 * k);
        emit_add_imm(page + 16 * k, 0x40000u * (uint32_t)k + 1);
        /* Every function so far, the new one and the translated old ones. */
        for (int j = 0; j <= k; j++)
            check("grow", k, fns[j], 0x40000u * (uint32_t)j + 1);
    }
    munmap(page, 4096);
}

int main(void)
{
    part_rwx();
    part_alias();
    part_self();
    part_wx();
    part_grow();
    printf("UJIT-OK calls=%lu\n", calls);
    return 0;
}
