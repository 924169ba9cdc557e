/*
 * portloop.c: the cost of an exit, measured from the guest's side.
 *
 * count=N writes (default 1000) to an I/O port nothing handles in the
 * kernel, so each one is a full round trip: guest -> KVM -> the
 * launcher's run loop -> KVM -> guest. The loop itself is four
 * instructions; a benchmark divides the launcher's wall time by N.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/printf.h"

#define PORTLOOP_PORT	0x510	/* no device of ours lives here */

int guest_main(struct boot_params *bp)
{
	u64 count = cmdline_get_u64(bp, "count", 1000);
	u64 i;

	for (i = 0; i < count; i++)
		outb(PORTLOOP_PORT, (u8)i);	/* iteration counter, low byte */

	printf("portloop: done %lu\n", count);
	return 0;
}
