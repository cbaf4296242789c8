/* nop: the tiny static child that forkexec execs. No libc: it exits with the
 * number given as argv[1] (mod 256), so the parent can check that the exec
 * really ran this program with its arguments. */
__attribute__((used)) static void nop_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    long code = 0;
    if (argc > 1)
        for (const char *s = argv[1]; *s >= '0' && *s <= '9'; s++)
            code = code * 10 + (*s - '0');
    __asm__ volatile("syscall" : : "a"(231L), "D"(code & 255) : "rcx", "r11", "memory");
    __builtin_unreachable();
}

__asm__(".globl _start\n"
        "_start:\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call nop_main\n"
        "  hlt\n");
