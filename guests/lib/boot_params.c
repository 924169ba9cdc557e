/*
 * boot_params.c: reading the command line and the e820 map.
 *
 * Everything here reads memory the launcher wrote and never writes it.
 */
#include "boot_params.h"

/* If one of these fails, a field above is at the wrong offset. */
_Static_assert(offsetof(struct boot_params, ext_cmd_line_ptr) == 0x0c8, "");
_Static_assert(offsetof(struct boot_params, e820_entries) == 0x1e8, "");
_Static_assert(offsetof(struct boot_params, cmd_line_ptr) == 0x228, "");
_Static_assert(offsetof(struct boot_params, e820_table) == 0x2d0, "");
_Static_assert(sizeof(struct e820_entry) == 20, "");
_Static_assert(sizeof(struct boot_params) == 4096, "");

const char *cmdline(const struct boot_params *bp)
{
	u64 addr = bp->cmd_line_ptr | (u64)bp->ext_cmd_line_ptr << 32;

	/* Identity mapped, so the physical address is the pointer. */
	return addr ? (const char *)addr : "";
}

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

size_t cmdline_value_len(const char *value)
{
	size_t n = 0;

	while (value[n] && !is_space(value[n]))
		n++;
	return n;
}

const char *cmdline_get(const struct boot_params *bp, const char *key)
{
	const char *p = cmdline(bp);
	const char *found = NULL;

	/* Walk word by word; a word matches if it starts with "key=". */
	while (*p) {
		const char *k = key;
		const char *w;

		while (is_space(*p))
			p++;
		w = p;
		while (*k && *w == *k) {
			w++;
			k++;
		}
		if (*k == '\0' && *w == '=')
			found = w + 1;		/* keep going: last one wins */
		while (*p && !is_space(*p))
			p++;
	}
	return found;
}

bool cmdline_is(const struct boot_params *bp, const char *key,
		const char *value)
{
	const char *v = cmdline_get(bp, key);
	size_t i;

	if (!v)
		return false;
	for (i = 0; value[i]; i++)
		if (v[i] != value[i])
			return false;
	return v[i] == '\0' || is_space(v[i]);
}

static int digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return 99;			/* not a digit in any base we use */
}

bool parse_u64(const char *s, u64 *value, const char **end)
{
	unsigned int base = 10;
	u64 v = 0;
	const char *start;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (start = s; digit_value(*s) < (int)base; s++)
		v = v * base + digit_value(*s);	/* wraps silently if huge */
	if (end)
		*end = s;
	if (s == start)
		return false;
	*value = v;
	return true;
}

u64 cmdline_get_u64(const struct boot_params *bp, const char *key, u64 dflt)
{
	const char *v = cmdline_get(bp, key);
	const char *end;
	u64 n;

	if (!v || !parse_u64(v, &n, &end) || !(*end == '\0' || is_space(*end)))
		return dflt;
	return n;
}

unsigned int e820_count(const struct boot_params *bp)
{
	/* Never trust a count beyond the table that holds the entries. */
	if (bp->e820_entries > E820_MAX_ENTRIES_ZEROPAGE)
		return E820_MAX_ENTRIES_ZEROPAGE;
	return bp->e820_entries;
}

const struct e820_entry *e820_entry(const struct boot_params *bp,
				    unsigned int i)
{
	return &bp->e820_table[i];
}

u64 max_pfn(const struct boot_params *bp)
{
	u64 end = 0;
	unsigned int i;

	for (i = 0; i < e820_count(bp); i++) {
		const struct e820_entry *e = e820_entry(bp, i);

		if (e->type == E820_TYPE_RAM && e->addr + e->size > end)
			end = e->addr + e->size;
	}
	return end >> 12;
}
