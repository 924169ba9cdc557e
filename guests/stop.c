/*
 * stop.c: every way a guest can stop, chosen by how= on the command line.
 *
 *   how=shutdown  LHCALL_SHUTDOWN with status=N (default 0)
 *   how=reboot    LHCALL_SHUTDOWN with the reboot bit (and status=N)
 *   how=i8042     pulse the reset line through the keyboard controller
 *   how=triple    triple fault (fault=ud2, the default, or fault=div)
 *   how=hang      cli; hlt for ever: only the launcher can stop us
 *   how=spin      an endless jump: no exits at all, not even hlt
 *
 * The launcher must turn each of these into an exit status, or, for the
 * last two, be stopped from outside (its --timeout, a signal).
 */
#include "lib/boot_params.h"
#include "lib/hypercall.h"
#include "lib/io.h"
#include "lib/printf.h"

#define I8042_COMMAND	0x64
#define I8042_RESET	0xfe	/* pulse output line 0: the CPU reset */

/*
 * With an IDT of limit 0 no exception can be delivered: the fault raises
 * #GP while delivering, that becomes a double fault, which cannot be
 * delivered either, and the CPU gives up: a triple fault, which KVM turns
 * into KVM_EXIT_SHUTDOWN.
 */
static noreturn void triple_fault(bool divide)
{
	struct {
		u16 limit;
		u64 base;
	} packed empty_idt = { 0, 0 };
	volatile unsigned int zero = 0;	/* volatile: a real divide */
	unsigned int lo = 1, hi = 0;

	asm volatile("lidt %0" : : "m"(empty_idt));
	if (divide)					/* #DE */
		asm volatile("divl %2" : "+a"(lo), "+d"(hi) : "r"(zero));
	asm volatile("ud2");				/* #UD */
	halt_forever();
}

int guest_main(struct boot_params *bp)
{
	const char *how = cmdline_get(bp, "how");
	unsigned int status = cmdline_get_u64(bp, "status", 0) & 0xff;

	if (!how) {
		printf("stop: no how= on the command line\n");
		return 2;
	}
	printf("stop: %.*s\n", (int)cmdline_value_len(how), how);

	if (cmdline_is(bp, "how", "shutdown")) {
		lhcall_shutdown(status);
	} else if (cmdline_is(bp, "how", "reboot")) {
		lhcall_reboot(status);
	} else if (cmdline_is(bp, "how", "i8042")) {
		outb(I8042_COMMAND, I8042_RESET);
	} else if (cmdline_is(bp, "how", "triple")) {
		triple_fault(cmdline_is(bp, "fault", "div"));
	} else if (cmdline_is(bp, "how", "hang")) {
		halt_forever();
	} else if (cmdline_is(bp, "how", "spin")) {
		asm volatile("1: jmp 1b");
	} else {
		printf("stop: unknown how\n");
		return 2;
	}

	/* Only a launcher that ignored the request gets us here. */
	printf("stop: still running\n");
	return 255;
}
