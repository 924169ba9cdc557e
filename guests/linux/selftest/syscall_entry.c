// SPDX-License-Identifier: GPL-2.0
/*
 * syscall_entry: what a hostile program gets from the SYSCALL fixup.
 *
 * pylguest's kernel (guests/linux/patches/0001-*) runs a system call when a
 * user-mode fault lands exactly on entry_SYSCALL_64, because that is what
 * SYSCALL does on a KVM that emulates kernel mode.  Any program can cause the
 * same fault on purpose: jump to entry_SYSCALL_64 itself, with RCX and R11
 * (the return address and flags SYSCALL would have saved) set to whatever it
 * likes.  This program does that, three ways, and says what came back:
 *
 *   syscall_entry ADDR flags   R11 asks for IOPL 3 (port I/O and cli in user
 *                              mode), NT and DF; the system call is a signal
 *                              to ourselves, whose handler prints the flags
 *                              the kernel saved for us, i.e. what it would
 *                              return to user mode with (only DF is a
 *                              program's to set)
 *   syscall_entry ADDR kernel  RCX is a kernel address: must die of SIGSEGV
 *   syscall_entry ADDR plain   a well-formed fake SYSCALL: getpid() runs
 *
 * ADDR is entry_SYSCALL_64's address, in hex (from /proc/kallsyms).
 *
 * No libc: a static glibc program costs seconds to start where kernel mode
 * is emulated, and nothing may run between the jump and the checks anyway.
 * Build: gcc -static -nostdlib -fno-pie -no-pie -O2 -o syscall_entry syscall_entry.c
 */

#define NR_WRITE	1
#define NR_RT_SIGACTION	13
#define NR_RT_SIGRETURN	15
#define NR_GETPID	39
#define NR_EXIT		60
#define NR_KILL		62
#define SIGUSR1		10
#define SA_SIGINFO	4
#define SA_RESTORER	0x04000000
/* struct ucontext: flags, link, stack_t (24 bytes), then the sigcontext,
 * whose 18th register is eflags (arch/x86/include/uapi/asm/sigcontext.h). */
#define UCONTEXT_EFLAGS	(8 + 8 + 24 + 17 * 8)
#define FLAG_IF		(1UL << 9)
#define FLAG_DF		(1UL << 10)
#define FLAG_IOPL	(3UL << 12)
#define FLAG_NT		(1UL << 14)

static long sys4(long nr, long a, long b, long c, long d)
{
	register long r10 asm("r10") = d;

	asm volatile("syscall"
		     : "+a" (nr)
		     : "D" (a), "S" (b), "d" (c), "r" (r10)
		     : "rcx", "r11", "memory");
	return nr;
}

static long sys(long nr, long a, long b, long c)
{
	return sys4(nr, a, b, c, 0);
}

static void say(const char *text)
{
	const char *end = text;

	while (*end)
		end++;
	sys(NR_WRITE, 1, (long)text, end - text);
}

static const char *digit(unsigned long value)
{
	static char text[2];

	text[0] = '0' + value;
	return text;
}

/*
 * Jump to `entry` as SYSCALL would have, for system call `nr` with two
 * arguments, returning to `rcx` (0: right here) with R11 = `r11`.
 */
static unsigned long fake_syscall(unsigned long entry, unsigned long nr,
				  unsigned long a0, unsigned long a1,
				  unsigned long rcx, unsigned long r11)
{
	asm volatile("lea 1f(%%rip), %%rcx\n\t"
		     "test %[rcx], %[rcx]\n\t"
		     "cmovnz %[rcx], %%rcx\n\t"
		     "mov %[r11], %%r11\n\t"
		     "jmp *%[entry]\n"
		     "1:\n\t"
		     "cld\n\t"
		     : "+a" (nr)
		     : [entry] "r" (entry), [rcx] "r" (rcx), [r11] "r" (r11),
		       "D" (a0), "S" (a1)
		     : "rcx", "r11", "memory", "cc");
	return nr;
}

/* The flags the kernel saved when it delivered SIGUSR1 to us. */
static unsigned long saved_flags;

static void on_signal(int signo, void *info, void *ucontext)
{
	(void)signo;
	(void)info;
	saved_flags = *(unsigned long *)((char *)ucontext + UCONTEXT_EFLAGS);
}

void restorer(void);
asm("restorer: mov $15, %eax\n\tsyscall\n");   /* NR_RT_SIGRETURN */

static void catch_sigusr1(void)
{
	struct {
		void *handler;
		unsigned long flags;
		void *restorer;
		unsigned long mask;
	} action = { on_signal, SA_SIGINFO | SA_RESTORER, restorer, 0 };

	sys4(NR_RT_SIGACTION, SIGUSR1, (long)&action, 0, sizeof(action.mask));
}

static unsigned long parse_hex(const char *text)
{
	unsigned long value = 0;

	for (; *text; text++) {
		char c = *text | 0x20;

		value = value * 16 + (c <= '9' ? c - '0' : c - 'a' + 10);
	}
	return value;
}

static int same(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int run(int argc, char **argv)
{
	unsigned long entry;
	long pid = sys(NR_GETPID, 0, 0, 0);

	if (argc != 3) {
		say("usage: syscall_entry ENTRY_SYSCALL_64 flags|kernel|plain\n");
		return 2;
	}
	entry = parse_hex(argv[1]);
	if (same(argv[2], "flags")) {
		catch_sigusr1();
		fake_syscall(entry, NR_KILL, pid, SIGUSR1, 0,
			     0x2 | FLAG_IF | FLAG_IOPL | FLAG_NT | FLAG_DF);
		say(saved_flags ? "flags: signalled" : "flags: no signal");
		say(", iopl ");
		say(digit((saved_flags & FLAG_IOPL) >> 12));
		say(", nt ");
		say(digit((saved_flags & FLAG_NT) >> 14));
		say(", df ");
		say(digit((saved_flags & FLAG_DF) >> 10));
		say("\n");
		return 0;
	}
	if (same(argv[2], "kernel")) {
		fake_syscall(entry, NR_GETPID, 0, 0, entry, 0x2 | FLAG_IF);
		say("kernel: came back from a kernel address\n");
		return 1;
	}
	say(fake_syscall(entry, NR_GETPID, 0, 0, 0, 0x2 | FLAG_IF) == (unsigned long)pid ?
	    "plain: pid ok\n" : "plain: pid wrong\n");
	return 0;
}

/* The kernel starts us with argc, then argv[], on the stack. */
void __attribute__((used)) start_c(long *stack)
{
	sys(NR_EXIT, run((int)stack[0], (char **)(stack + 1)), 0, 0);
}

asm(".globl _start\n"
    "_start:\n\t"
    "mov %rsp, %rdi\n\t"
    "and $-16, %rsp\n\t"
    "call start_c\n\t"
    "hlt\n");
