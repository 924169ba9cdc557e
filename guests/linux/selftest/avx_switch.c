/* avx_switch: does a context switch keep a process's AVX registers?
 *
 *     gcc -static -O2 -o avx_switch avx_switch.c
 *     avx_switch [ROUNDS]                                  (default 300)
 *     avx_switch strings
 *     avx_switch copy [ROUNDS]                             (default 50)
 *
 * Two processes, pinned to one CPU, take turns: each loads a pattern of
 * its own into the vector registers, gives the CPU to the other with
 * sched_yield(), and on its return checks that the pattern is still
 * there.  Load, yield and check are one asm block, so nothing of the
 * compiler's runs in between.  Checked:
 *
 *   xmm        the low 128 bits of ymm0-15 (FXSAVE keeps them: a control)
 *   ymm upper  bits 128-255 of ymm0-15                          (AVX)
 *   zmm        zmm16-31, all 512 bits                     (AVX-512F)
 *   k          k0-7, the low 16 bits each (KMOVW)         (AVX-512F)
 *
 * Each is tested only where CPUID says the CPU has it and XGETBV(0) says
 * the kernel enabled its state (OSXSAVE, then XCR0's YMM, and opmask and
 * ZMM bits), as the SDM tells a program to check.  A round counts as a
 * context switch only if the other process ran during the yield (a
 * shared counter moved); registers are judged on those rounds only.
 *
 * Prints one line:
 *
 *   avx_switch: ymm upper kept N/M, zmm kept N/M, k kept N/M, xmm kept N/M
 *               (S switches; L registers held the other process's values)
 *
 * (zmm and k read "untested" without AVX-512), and exits 0 when every
 * register was kept, 1 when one was not, 77 when the CPU or the kernel
 * gives no AVX (nothing to test), 2 when no context switch happened or
 * something failed.  A kernel that saves the FPU state with FXSAVE alone
 * while user mode runs with AVX enabled loses the upper halves: each
 * process then finds the other's values there (docs/linux.md, "Two
 * programs starting at once").
 *
 * `avx_switch strings` asks instead which of glibc's string functions,
 * as this process's glibc chose them (by CPUID and GLIBC_TUNABLES), touch
 * the ymm upper halves: each is called between loading a pattern into
 * ymm0-15 and reading it back.  The AVX and EVEX variants load ymm and
 * end with VZEROUPPER; the SSE2 ones leave the upper halves alone.  It
 * prints
 *
 *   avx_switch: glibc 2.36 string functions that touch ymm: none (0 of 24)
 *
 * (or their names), and exits 0 for none, 1 for some, 77 without AVX.
 * The launcher's GLIBC_TUNABLES on an emulating KVM should make it none.
 *
 * `avx_switch copy` makes the context switch happen inside glibc's memcpy
 * and memset, as it happened to busybox starting up: the destination page
 * is PROT_NONE, so the first store faults; the SIGSEGV handler yields to
 * the second process (which leaves ymm0-15 full of 0xee bytes), makes the
 * page writable and returns, and the store runs again.  An AVX memcpy has
 * the data in ymm registers by then; an SSE one has it in xmm.  It prints
 *
 *   avx_switch: switched inside memcpy: 0/50 copies wrong, memset: 0/50 wrong
 *
 * and exits 0 when every copy was right, 1 when one was not, 77 without
 * AVX, 2 when no context switch happened.
 */

#define _GNU_SOURCE
#include <cpuid.h>
#include <gnu/libc-version.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <wchar.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define NYMM 16
#define NZMM 16                       /* zmm16-31 */
#define NK 8

struct regs {
    uint64_t ymm[NYMM][4];            /* 4 lanes of 64 bits: 0-1 xmm, 2-3 upper */
    uint64_t zmm[NZMM][8];
    uint16_t k[NK];
} __attribute__((aligned(64)));

/* What one process saw, and the count of its turns (which the other reads). */
struct tally {
    volatile uint64_t turns;
    long switches, xmm_kept, xmm_seen, upper_kept, upper_seen;
    long zmm_kept, zmm_seen, k_kept, k_seen, foreign;
};

static int have_avx512;
static void pin_to_one_cpu(void);

/* A value no other (process, register, lane, round) has: the process's
 * number in it lets a lost register tell whose value it holds instead. */
static uint64_t pattern(int proc, int reg, int lane, long round)
{
    return 0xa5a5000000000000ull | (uint64_t)(proc + 1) << 44 | (uint64_t)reg << 36
           | (uint64_t)lane << 32 | (uint32_t)round;
}

/* Two processes on one CPU take turns: pin first, so the child is pinned too. */
static pid_t fork_on_one_cpu(void)
{
    pin_to_one_cpu();
    fflush(stdout);
    pid_t child = fork();
    if (child < 0)
        perror("avx_switch: fork");
    return child;
}

static int owner(uint64_t value)   /* whose pattern this is, or -1 */
{
    return (value >> 48) == 0xa5a5 ? (int)((value >> 44) & 0xf) - 1 : -1;
}

static uint16_t kpattern(int proc, int reg, long round)
{
    return (uint16_t)(0x8000 | proc << 14 | reg << 11 | (round & 0x7ff));
}

/* Load ymm0-15 from `in`, sched_yield(), store ymm0-15 to `out`. */
__attribute__((target("avx"), noinline))
static void yield_ymm(const struct regs *in, struct regs *out)
{
    __asm__ volatile(
#define LOAD(n) "vmovdqu " #n "*32(%[in]), %%ymm" #n "\n\t"
#define STORE(n) "vmovdqu %%ymm" #n ", " #n "*32(%[out])\n\t"
        LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) LOAD(6) LOAD(7)
        LOAD(8) LOAD(9) LOAD(10) LOAD(11) LOAD(12) LOAD(13) LOAD(14) LOAD(15)
        "mov %[nr], %%eax\n\t"
        "syscall\n\t"
        STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
        STORE(8) STORE(9) STORE(10) STORE(11) STORE(12) STORE(13) STORE(14) STORE(15)
        "vzeroupper\n\t"
        :
        : [in] "r"(in), [out] "r"(out), [nr] "i"(SYS_sched_yield)
        : "rax", "rcx", "r11", "memory",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
          "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

/* The same with zmm16-31 and k0-7 as well. */
__attribute__((target("avx512f"), noinline))
static void yield_avx512(const struct regs *in, struct regs *out)
{
    __asm__ volatile(
        LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) LOAD(6) LOAD(7)
        LOAD(8) LOAD(9) LOAD(10) LOAD(11) LOAD(12) LOAD(13) LOAD(14) LOAD(15)
#define ZLOAD(n, i) "vmovdqu64 " #i "*64+%c[z](%[in]), %%zmm" #n "\n\t"
#define ZSTORE(n, i) "vmovdqu64 %%zmm" #n ", " #i "*64+%c[z](%[out])\n\t"
        ZLOAD(16, 0) ZLOAD(17, 1) ZLOAD(18, 2) ZLOAD(19, 3) ZLOAD(20, 4) ZLOAD(21, 5)
        ZLOAD(22, 6) ZLOAD(23, 7) ZLOAD(24, 8) ZLOAD(25, 9) ZLOAD(26, 10) ZLOAD(27, 11)
        ZLOAD(28, 12) ZLOAD(29, 13) ZLOAD(30, 14) ZLOAD(31, 15)
#define KLOAD(n) "kmovw " #n "*2+%c[k](%[in]), %%k" #n "\n\t"
#define KSTORE(n) "kmovw %%k" #n ", " #n "*2+%c[k](%[out])\n\t"
        KLOAD(0) KLOAD(1) KLOAD(2) KLOAD(3) KLOAD(4) KLOAD(5) KLOAD(6) KLOAD(7)
        "mov %[nr], %%eax\n\t"
        "syscall\n\t"
        STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
        STORE(8) STORE(9) STORE(10) STORE(11) STORE(12) STORE(13) STORE(14) STORE(15)
        ZSTORE(16, 0) ZSTORE(17, 1) ZSTORE(18, 2) ZSTORE(19, 3) ZSTORE(20, 4) ZSTORE(21, 5)
        ZSTORE(22, 6) ZSTORE(23, 7) ZSTORE(24, 8) ZSTORE(25, 9) ZSTORE(26, 10) ZSTORE(27, 11)
        ZSTORE(28, 12) ZSTORE(29, 13) ZSTORE(30, 14) ZSTORE(31, 15)
        KSTORE(0) KSTORE(1) KSTORE(2) KSTORE(3) KSTORE(4) KSTORE(5) KSTORE(6) KSTORE(7)
        "vzeroupper\n\t"
        :
        : [in] "r"(in), [out] "r"(out), [nr] "i"(SYS_sched_yield),
          [z] "i"(offsetof(struct regs, zmm)), [k] "i"(offsetof(struct regs, k))
        : "rax", "rcx", "r11", "memory",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
          "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
          "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
          "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31",
          "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7");
}

static void fill(struct regs *r, int proc, long round)
{
    for (int i = 0; i < NYMM; i++)
        for (int lane = 0; lane < 4; lane++)
            r->ymm[i][lane] = pattern(proc, i, lane, round);
    for (int i = 0; i < NZMM; i++)
        for (int lane = 0; lane < 8; lane++)
            r->zmm[i][lane] = pattern(proc, 16 + i, lane, round);
    for (int i = 0; i < NK; i++)
        r->k[i] = kpattern(proc, i, round);
}

static void check(const struct regs *want, const struct regs *got, int proc,
                  struct tally *t)
{
    int other = !proc;
    for (int i = 0; i < NYMM; i++) {
        int xmm = 1, upper = 1, foreign = 0;
        for (int lane = 0; lane < 4; lane++) {
            if (got->ymm[i][lane] == want->ymm[i][lane])
                continue;
            *(lane < 2 ? &xmm : &upper) = 0;
            foreign |= owner(got->ymm[i][lane]) == other;
        }
        t->foreign += foreign;
        t->xmm_seen++, t->xmm_kept += xmm;
        t->upper_seen++, t->upper_kept += upper;
    }
    if (!have_avx512)
        return;
    for (int i = 0; i < NZMM; i++) {
        int kept = 1, foreign = 0;
        for (int lane = 0; lane < 8; lane++) {
            if (got->zmm[i][lane] == want->zmm[i][lane])
                continue;
            kept = 0;
            foreign |= owner(got->zmm[i][lane]) == other;
        }
        t->foreign += foreign;
        t->zmm_seen++, t->zmm_kept += kept;
    }
    for (int i = 0; i < NK; i++) {
        int kept = got->k[i] == want->k[i];
        t->k_seen++, t->k_kept += kept;
        t->foreign += !kept && (got->k[i] & 0xc000) == (0x8000 | other << 14);
    }
}

static void take_turns(int proc, long rounds, struct tally *mine, const struct tally *theirs)
{
    static struct regs want, got;
    for (long round = 0; round < rounds; round++) {
        fill(&want, proc, round);
        memset(&got, 0, sizeof got);
        uint64_t before = theirs->turns;
        if (have_avx512)
            yield_avx512(&want, &got);
        else
            yield_ymm(&want, &got);
        mine->turns++;
        if (theirs->turns == before)
            continue;                 /* the other did not run: no switch */
        mine->switches++;
        check(&want, &got, proc, mine);
    }
}

/* -- which string functions touch ymm ------------------------------------------------ */

static struct regs ymm_want, ymm_got;

__attribute__((noinline)) static void ymm_load(void)
{
    __asm__ volatile(
        LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) LOAD(6) LOAD(7)
        LOAD(8) LOAD(9) LOAD(10) LOAD(11) LOAD(12) LOAD(13) LOAD(14) LOAD(15)
        : : [in] "r"(&ymm_want) : "memory");
}

__attribute__((noinline)) static int ymm_touched(void)
{
    struct regs *out = &ymm_got;
    __asm__ volatile(
        STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
        STORE(8) STORE(9) STORE(10) STORE(11) STORE(12) STORE(13) STORE(14) STORE(15)
        "vzeroupper\n\t"
        : : [out] "r"(out) : "memory");
    for (int i = 0; i < NYMM; i++)
        if (ymm_got.ymm[i][2] != ymm_want.ymm[i][2] || ymm_got.ymm[i][3] != ymm_want.ymm[i][3])
            return 1;
    return 0;
}

#define LEN 4000
static char text_a[LEN + 64], text_b[LEN + 64];
static wchar_t wide_a[LEN / 4 + 16], wide_b[LEN / 4 + 16];
static void *volatile sink;
static volatile size_t len = LEN;
static volatile int absent = 'y';

static int strings(void)
{
    fill(&ymm_want, 0, 0);
    memset(text_a, 'x', LEN);
    memset(text_b, 'x', LEN);
    wmemset(wide_a, L'x', LEN / 4);
    wmemset(wide_b, L'x', LEN / 4);
    int touched = 0, tried = 0;
    const char *names[32];
    /* Each call's result goes to `sink`, so that none is left out. */
#define TRY(name, call) do {                                              \
        ymm_load();                                                       \
        sink = (void *)(uintptr_t)(call);                                 \
        if (ymm_touched())                                                \
            names[touched++] = name;                                      \
        tried++;                                                          \
    } while (0)
    TRY("memcpy", memcpy(text_b, text_a, len));
    TRY("memmove", memmove(text_b + 1, text_b, len));
    TRY("memset", memset(text_b, 'x', len));
    TRY("memchr", memchr(text_a, absent, len));
    TRY("memrchr", memrchr(text_a, absent, len));
    TRY("memcmp", memcmp(text_a, text_b, len));
    TRY("strlen", strlen(text_a));
    TRY("strnlen", strnlen(text_a, len));
    TRY("strchr", strchr(text_a, absent));
    TRY("strrchr", strrchr(text_a, absent));
    TRY("strcmp", strcmp(text_a, text_b));
    TRY("strncmp", strncmp(text_a, text_b, len));
    TRY("strcasecmp", strcasecmp(text_a, text_b));
    TRY("strcpy", strcpy(text_b, text_a));
    TRY("stpcpy", stpcpy(text_b, text_a));
    TRY("strncpy", strncpy(text_b, text_a, len));
    text_b[0] = 0;
    TRY("strcat", strcat(text_b, text_a + LEN / 2));
    TRY("strstr", strstr(text_a, "xxy"));
    TRY("rawmemchr", rawmemchr(text_a, 0));
    TRY("wcslen", wcslen(wide_a));
    TRY("wcscmp", wcscmp(wide_a, wide_b));
    TRY("wcschr", wcschr(wide_a, L'y'));
    TRY("wmemset", wmemset(wide_b, L'x', len / 4));
    TRY("wmemchr", wmemchr(wide_a, L'y', len / 4));
#undef TRY
    printf("avx_switch: glibc %s string functions that touch ymm: ", gnu_get_libc_version());
    if (!touched)
        printf("none");
    for (int i = 0; i < touched; i++)
        printf("%s%s", i ? " " : "", names[i]);
    printf(" (%d of %d)\n", touched, tried);
    return touched ? 1 : 0;
}

/* -- a context switch inside memcpy -------------------------------------------------- */

static char *fault_page;
static volatile uint64_t *other_turns;
static long fault_switches;

static void yield_and_unprotect(int sig, siginfo_t *info, void *context)
{
    (void)context;
    if ((char *)info->si_addr < fault_page || (char *)info->si_addr >= fault_page + 4096) {
        signal(sig, SIG_DFL);         /* a fault of another kind: die of it */
        return;
    }
    uint64_t before = *other_turns;
    sched_yield();
    fault_switches += *other_turns != before;
    mprotect(fault_page, 4096, PROT_READ | PROT_WRITE);
}

/* The second process: ymm0-15 full of 0xee, then yield; forever. */
static void leave_ee(volatile uint64_t *turns)
{
    static struct regs ee;
    memset(&ee, 0xee, sizeof ee);
    for (;;) {
        __asm__ volatile(
            LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) LOAD(6) LOAD(7)
            LOAD(8) LOAD(9) LOAD(10) LOAD(11) LOAD(12) LOAD(13) LOAD(14) LOAD(15)
            "mov %[nr], %%eax\n\t"
            "syscall\n\t"
            : : [in] "r"(&ee), [nr] "i"(SYS_sched_yield)
            : "rax", "rcx", "r11", "memory",
              "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
              "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
        (*turns)++;
    }
}

static int copy(long rounds)
{
    other_turns = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    fault_page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (other_turns == MAP_FAILED || fault_page == MAP_FAILED || rounds <= 0) {
        perror("avx_switch");
        return 2;
    }
    pid_t child = fork_on_one_cpu();
    if (child < 0)
        return 2;
    if (child == 0)
        leave_ee(other_turns);
    struct sigaction action = {.sa_sigaction = yield_and_unprotect, .sa_flags = SA_SIGINFO};
    sigaction(SIGSEGV, &action, NULL);
    char src[64], want[64];
    for (int i = 0; i < 64; i++)
        src[i] = (char)(i + 1);
    memset(want, 0x5a, sizeof want);
    long wrong_copies = 0, wrong_sets = 0;
    for (long round = 0; round < rounds; round++) {
        mprotect(fault_page, 4096, PROT_NONE);
        sink = memcpy(fault_page, src, len < 64 ? len : 64);
        wrong_copies += memcmp(fault_page, src, sizeof src) != 0;
        mprotect(fault_page, 4096, PROT_NONE);
        sink = memset(fault_page, want[0], len < 64 ? len : 64);
        wrong_sets += memcmp(fault_page, want, sizeof want) != 0;
    }
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    printf("avx_switch: switched inside memcpy: %ld/%ld copies wrong, memset: %ld/%ld wrong "
           "(%ld switches)\n", wrong_copies, rounds, wrong_sets, rounds, fault_switches);
    if (fault_switches == 0) {
        printf("avx_switch: no context switch happened: nothing was tested\n");
        return 2;
    }
    return wrong_copies || wrong_sets ? 1 : 0;
}

/* What this CPU and kernel let us test: 0 nothing, 1 AVX, 2 AVX and AVX-512. */
static int what_to_test(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & bit_OSXSAVE) || !(c & bit_AVX))
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x6) != 0x6)            /* SSE and YMM state */
        return 0;
    if (__get_cpuid_max(0, 0) < 7)
        return 1;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & bit_AVX512F) && (lo & 0xe0) == 0xe0 ? 2 : 1;
}

static void pin_to_one_cpu(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &set)) {
            CPU_ZERO(&set);
            CPU_SET(cpu, &set);
            sched_setaffinity(0, sizeof set, &set);    /* inherited by the child */
            return;
        }
}

static void kept(const char *name, long n, long m, int tested)
{
    if (tested)
        printf("%s kept %ld/%ld", name, n, m);
    else
        printf("%s untested", name);
}

int main(int argc, char **argv)
{
    int level = what_to_test();
    if (level == 0) {
        printf("avx_switch: skipped: no AVX (CPUID.1:ECX.OSXSAVE/AVX or XCR0.YMM clear)\n");
        return 77;
    }
    have_avx512 = level == 2;
    if (argc > 1 && strcmp(argv[1], "strings") == 0)
        return strings();
    if (argc > 1 && strcmp(argv[1], "copy") == 0)
        return copy(argc > 2 ? atol(argv[2]) : 50);
    struct tally *t = mmap(NULL, 2 * sizeof *t, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    long rounds = argc > 1 ? atol(argv[1]) : 300;
    if (t == MAP_FAILED || rounds <= 0) {
        perror("avx_switch");
        return 2;
    }
    memset(t, 0, 2 * sizeof *t);
    pid_t child = fork_on_one_cpu();
    if (child < 0)
        return 2;
    take_turns(child == 0, rounds, &t[child == 0], &t[child != 0]);
    if (child == 0)
        _exit(0);
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "avx_switch: the second process failed (status 0x%x)\n", status);
        return 2;
    }
    struct tally sum = {0};
    for (int i = 0; i < 2; i++) {
        sum.switches += t[i].switches;
        sum.xmm_kept += t[i].xmm_kept, sum.xmm_seen += t[i].xmm_seen;
        sum.upper_kept += t[i].upper_kept, sum.upper_seen += t[i].upper_seen;
        sum.zmm_kept += t[i].zmm_kept, sum.zmm_seen += t[i].zmm_seen;
        sum.k_kept += t[i].k_kept, sum.k_seen += t[i].k_seen;
        sum.foreign += t[i].foreign;
    }
    printf("avx_switch: ");
    kept("ymm upper", sum.upper_kept, sum.upper_seen, 1);
    printf(", ");
    kept("zmm", sum.zmm_kept, sum.zmm_seen, have_avx512);
    printf(", ");
    kept("k", sum.k_kept, sum.k_seen, have_avx512);
    printf(", ");
    kept("xmm", sum.xmm_kept, sum.xmm_seen, 1);
    printf(" (%ld switches; %ld registers held the other process's values)\n",
           sum.switches, sum.foreign);
    if (sum.switches == 0) {
        printf("avx_switch: no context switch happened: nothing was tested\n");
        return 2;
    }
    int all = sum.xmm_kept == sum.xmm_seen && sum.upper_kept == sum.upper_seen
              && sum.zmm_kept == sum.zmm_seen && sum.k_kept == sum.k_seen;
    return all ? 0 : 1;
}
