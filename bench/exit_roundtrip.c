/*
 * exit_roundtrip.c: the cheapest possible KVM launcher, as the baseline
 * for bench/exit_roundtrip.py.
 *
 * One VM, 1 MiB of memory, and a real-mode loop at 0x1000 that writes to
 * port 0x80 forever:
 *
 *     mov al, 0x41
 *  l: out 0x80, al
 *     inc al
 *     jmp l
 *
 * Every `out` exits to us (KVM_EXIT_IO); we count the exits and stop after
 * N. The run loop does nothing else, so the time per exit is what KVM
 * itself costs: guest -> host kernel -> this process -> host kernel -> guest.
 *
 * Usage: exit_roundtrip N     prints "<microseconds per exit> <exits>"
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define MEM_SIZE	(1 << 20)
#define CODE_ADDR	0x1000
/* Where pylguest's Vm puts the real-mode TSS and EPT identity map too. */
#define TSS_ADDR	0xFFFBD000
#define IDENTITY_MAP	0xFFFBC000ULL

/* count writes to 0x80, then one to 0x81: exit_roundtrip.py's real_mode_loop(). */
static unsigned char code[] = {
	0xB0, 0x41,		/* mov al, 0x41 */
	0xB9, 0x00, 0x00,	/* mov cx, count (set in main) */
	0xE6, 0x80,		/* l: out 0x80, al */
	0xFE, 0xC0,		/* inc al */
	0xE2, 0xFA,		/* loop l */
	0xE6, 0x81,		/* out 0x81, al */
	0xEB, 0xFE,		/* jmp $ */
};

/* Every call here either works or ends the program with its name. */
static long check(long ret, const char *what)
{
	if (ret < 0) {
		perror(what);
		exit(1);
	}
	return ret;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	long count = argc > 1 ? atol(argv[1]) : 20000;
	unsigned long long identity = IDENTITY_MAP;
	int kvm = check(open("/dev/kvm", O_RDWR | O_CLOEXEC), "/dev/kvm");
	int vm = check(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM");

	check(ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR), "KVM_SET_TSS_ADDR");
	check(ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity), "KVM_SET_IDENTITY_MAP_ADDR");
	check(ioctl(vm, KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");

	unsigned char *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		check(-1, "mmap guest memory");
	if (count < 1 || count >= 0xFFFF)
		check(-1, "count (1 to 65534: the guest counts in CX)");
	code[3] = (count + 1) & 0xFF;	/* + the untimed first exit */
	code[4] = (count + 1) >> 8;
	memcpy(mem + CODE_ADDR, code, sizeof(code));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (unsigned long)mem,
	};
	check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION");

	int vcpu = check(ioctl(vm, KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU");
	int run_size = check(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE,
				   MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		check(-1, "mmap kvm_run");

	struct kvm_sregs sregs;
	check(ioctl(vcpu, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	check(ioctl(vcpu, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE_ADDR, .rflags = 2 };
	check(ioctl(vcpu, KVM_SET_REGS, &regs), "KVM_SET_REGS");

	/* The first exit outside the timing: it pays for faulting in pages. */
	check(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");

	unsigned char expect = 0x42;
	double start = now();
	for (long i = 0; i < count; i++) {
		check(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
		unsigned char *data = (unsigned char *)run + run->io.data_offset;
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x80 ||
		    *data != expect++) {
			fprintf(stderr, "unexpected exit %u (port 0x%x) after %ld exits\n",
				run->exit_reason, run->io.port, i);
			return 1;
		}
	}
	double elapsed = now() - start;

	printf("%.3f %ld\n", elapsed / count * 1e6, count);
	return 0;
}
