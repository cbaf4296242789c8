/* forkexec: process creation. Each iteration forks, the child execs the tiny
 * static `nop` binary (in the same directory as this program) with argument
 * i % 200, and the parent waits and checks the exit status.
 * Usage: forkexec [COUNT] */
#include <errno.h>
#include <libgen.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "bench.h"

int main(int argc, char **argv)
{
    long count = bench_size(argc, argv, 500);
    char self[4096], nop[4200];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        perror("forkexec: readlink /proc/self/exe");
        return 1;
    }
    self[n] = '\0';
    snprintf(nop, sizeof nop, "%s/nop", dirname(self));
    if (access(nop, X_OK) != 0) {
        fprintf(stderr, "forkexec: %s: %s\n", nop, strerror(errno));
        return 1;
    }

    uint64_t sum = 0;
    double t0 = bench_start("forkexec");
    for (long i = 0; i < count; i++) {
        char arg[16];
        int want = (int)(i % 200);
        snprintf(arg, sizeof arg, "%d", want);
        pid_t pid = fork();
        if (pid < 0) {
            perror("forkexec: fork");
            return 1;
        }
        if (pid == 0) {
            char *cargv[] = {"nop", arg, NULL};
            char *cenv[] = {NULL};
            execve(nop, cargv, cenv);
            _exit(255);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != want) {
            fprintf(stderr, "forkexec: child %ld: bad status 0x%x (want exit %d)\n", i, st, want);
            return 1;
        }
        sum = mix64(sum, (uint64_t)WEXITSTATUS(st));
    }
    double t1 = bench_now();
    bench_report("forkexec", count, t1 - t0, sum);
    return 0;
}
