/*
 * hello.c: what a kernel learns at boot, and nothing else.
 *
 * It reads boot_params exactly as Linux does: the command line, the e820
 * memory map (printed in the format of Linux's "BIOS-e820:" lines), and
 * from that map max_pfn, which is where the lguest device page must be.
 * Then it exits with the status given as exit=N (default 0).
 */
#include "lib/boot_params.h"
#include "lib/printf.h"

static const char *e820_type_name(u32 type)
{
	switch (type) {
	case E820_TYPE_RAM:
		return "usable";
	case E820_TYPE_RESERVED:
		return "reserved";
	default:
		return NULL;
	}
}

int guest_main(struct boot_params *bp)
{
	unsigned int i;
	u64 status;

	printf("hello: command line: %s\n", cmdline(bp));

	for (i = 0; i < e820_count(bp); i++) {
		const struct e820_entry *e = e820_entry(bp, i);
		const char *name = e820_type_name(e->type);

		printf("hello: e820: [mem 0x%016lx-0x%016lx] ",
		       e->addr, e->addr + e->size - 1);
		if (name)
			printf("%s\n", name);
		else
			printf("type %u\n", e->type);
	}

	printf("hello: max_pfn: 0x%lx\n", max_pfn(bp));
	printf("hello: device page: 0x%lx\n", max_pfn(bp) << 12);

	status = cmdline_get_u64(bp, "exit", 0) & 0xff;
	printf("hello: exit %lu\n", status);
	return (int)status;
}
