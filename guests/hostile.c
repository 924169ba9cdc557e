/*
 * hostile.c: a guest that does what no driver should, over and over.
 *
 * A launcher must survive every guest, and must not let one cost the host
 * more than a small bound: not memory, not time, and not lines in the
 * host's logs.  This guest makes those mistakes on purpose, chosen by
 * do= on the command line:
 *
 *   do=notify    count=N LHCALL_NOTIFY calls (default 20000) on an address
 *                that is neither a device, a vring nor guest RAM: each one
 *                is a guest error the launcher must report, and a flood of
 *                them must not become a flood of lines on its stderr
 *
 * Then it exits with status 0, so a test can also check that the guest
 * was never stopped for it.
 */
#include "lib/boot_params.h"
#include "lib/hypercall.h"
#include "lib/printf.h"

/* Above any RAM we have (at most 16 GiB), below no device: nothing. */
#define NOWHERE		0x7ff000000000UL

int guest_main(struct boot_params *bp)
{
	u64 count = cmdline_get_u64(bp, "count", 20000);
	u64 i;

	if (!cmdline_is(bp, "do", "notify")) {
		printf("hostile: no do= (notify) on the command line\n");
		return 2;
	}
	printf("hostile: %lu bad notifies\n", count);
	for (i = 0; i < count; i++)
		lhcall_notify(NOWHERE + (i % 64) * 8);
	printf("hostile: done\n");
	return 0;
}
