/* syscall: system call round trips. One unit is 1000 iterations of getppid
 * (through syscall(2): glibc does not cache it, but be explicit), a 1-byte
 * write to /dev/null, and a 64-byte write + read on a pipe.
 * Usage: syscall [THOUSANDS] */
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "bench.h"

int main(int argc, char **argv)
{
    long units = bench_size(argc, argv, 100);
    int null_fd = open("/dev/null", O_WRONLY);
    int p[2];
    if (null_fd < 0 || pipe(p) != 0) {
        perror("syscall: open /dev/null or pipe");
        return 1;
    }
    unsigned char out[64], in[64];
    uint64_t sum = 0;
    double t0 = bench_start("syscall");
    for (long u = 0; u < units; u++) {
        for (int i = 0; i < 1000; i++) {
            long ppid = syscall(SYS_getppid);
            sum += ppid > 0; /* pids differ between hosts: count only */
            sum += write(null_fd, out, 1);
            for (int k = 0; k < 64; k += 8)
                out[k] = (unsigned char)(i + k + u);
            if (write(p[1], out, sizeof out) != (ssize_t)sizeof out ||
                read(p[0], in, sizeof in) != (ssize_t)sizeof in) {
                perror("syscall: pipe write/read");
                return 1;
            }
            sum = mix64(sum, in[0] ^ ((uint64_t)in[56] << 8));
        }
    }
    double t1 = bench_now();
    bench_report("syscall", units, t1 - t0, sum);
    return 0;
}
