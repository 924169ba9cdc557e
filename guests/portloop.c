/*
 * portloop.c: the cost of an exit, measured from the guest's side.
 *
 * count=N writes (default 1000) to an I/O port nothing handles in the
 * kernel, so each one is a full round trip: guest -> KVM -> the
 * launcher's run loop -> KVM -> guest. The loop itself is three
 * instructions, as in the C baseline; a benchmark divides the launcher's
 * wall time by N.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/printf.h"

#define PORTLOOP_PORT	0x510	/* no device of ours lives here */

int guest_main(struct boot_params *bp)
{
	u64 count = cmdline_get_u64(bp, "count", 1000);
	u64 left = count;

	/*
	 * The loop of bench/exit_roundtrip.c's C baseline: the `out` and two
	 * more instructions.  Where KVM emulates kernel mode, each of them
	 * costs about half a microsecond, so a loop one instruction longer
	 * than the baseline's would be counted as the launcher's.
	 */
	if (count)
		asm volatile("1:	outb %%al, %%dx\n\t"
			     "dec %%rcx\n\t"
			     "jnz 1b"
			     : "+c"(left) : "a"(0), "d"(PORTLOOP_PORT) : "memory");

	printf("portloop: done %lu\n", count);
	return 0;
}
