/*
 * boot_params.h: the "zero page" the launcher fills in for us, read the
 * way Linux reads it (arch/x86/include/uapi/asm/bootparam.h).
 *
 * Only the fields the guests use are named; the rest is padding, and the
 * static asserts in boot_params.c pin every named field to its offset.
 */
#ifndef GUEST_BOOT_PARAMS_H
#define GUEST_BOOT_PARAMS_H

#include "types.h"

#define E820_MAX_ENTRIES_ZEROPAGE	128

#define E820_TYPE_RAM		1	/* usable RAM */
#define E820_TYPE_RESERVED	2

struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} packed;				/* 20 bytes each, back to back */

struct boot_params {
	u8  _pad0[0x0c8];
	u32 ext_cmd_line_ptr;		/* 0x0c8: high 32 bits of cmd_line_ptr */
	u8  _pad1[0x1e8 - 0x0cc];
	u8  e820_entries;		/* 0x1e8: how many e820_table entries */
	u8  _pad2[0x228 - 0x1e9];
	u32 cmd_line_ptr;		/* 0x228: in the setup header (0x1f1) */
	u8  _pad3[0x2d0 - 0x22c];
	struct e820_entry e820_table[E820_MAX_ENTRIES_ZEROPAGE]; /* 0x2d0 */
	u8  _pad4[0x1000 - 0xcd0];
} packed;

/* The command line, "" if there is none. */
const char *cmdline(const struct boot_params *bp);

/*
 * The value of `key=value` on the command line, or NULL if the key is not
 * there. The value is not NUL-terminated: it ends at a space or at the end
 * of the line; cmdline_value_len() measures it. As in Linux, a key given
 * twice takes its last value.
 */
const char *cmdline_get(const struct boot_params *bp, const char *key);
size_t cmdline_value_len(const char *value);

/* Does `key` have exactly this value? */
bool cmdline_is(const struct boot_params *bp, const char *key,
		const char *value);

/* `key=N` as a number (decimal, or hex with 0x), or dflt if the key is
 * missing or its value is not a number. */
u64 cmdline_get_u64(const struct boot_params *bp, const char *key, u64 dflt);

/* Parse a decimal or 0x-hex number at s; *end gets the first unused
 * character. Returns false if there are no digits. */
bool parse_u64(const char *s, u64 *value, const char **end);

/* The e820 map: how many entries (at most the table size), and each one. */
unsigned int e820_count(const struct boot_params *bp);
const struct e820_entry *e820_entry(const struct boot_params *bp,
				    unsigned int i);

/*
 * One past the highest usable page frame, as Linux computes it
 * (e820__end_of_ram_pfn): the highest end of any usable RAM entry, in
 * pages. The lguest device page sits exactly at max_pfn << 12.
 */
u64 max_pfn(const struct boot_params *bp);

#endif
