/* printf.c: formatted output, one character at a time, to the UART. */
#include "printf.h"
#include "types.h"
#include "uart.h"

static int put(char c)
{
	if (c == '\n')
		uart_putc('\r');
	uart_putc(c);
	return 1;
}

/* value in base 10 or 16, padded on the left to width with pad. */
static int put_number(u64 value, unsigned int base, bool negative,
		      unsigned int width, char pad)
{
	char digits[24];		/* 2^64 has 20 decimal digits */
	unsigned int n = 0;
	int count = 0;

	do {
		digits[n++] = "0123456789abcdef"[value % base];
		value /= base;
	} while (value);
	if (negative && pad == '0')
		count += put('-');	/* -0042, not 00-42 */
	while (n + (negative ? 1 : 0) < width--)
		count += put(pad);
	if (negative && pad != '0')
		count += put('-');
	while (n)
		count += put(digits[--n]);
	return count;
}

int vprintf(const char *fmt, va_list ap)
{
	int count = 0;

	for (; *fmt; fmt++) {
		char pad = ' ';
		unsigned int width = 0;
		size_t precision = (size_t)-1;	/* %s: at most this many */
		int longs = 0;

		if (*fmt != '%') {
			count += put(*fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == '.') {
			fmt++;
			precision = 0;
			if (*fmt == '*') {
				precision = va_arg(ap, int);
				fmt++;
			}
			for (; *fmt >= '0' && *fmt <= '9'; fmt++)
				precision = precision * 10 + (*fmt - '0');
		}
		while (*fmt == 'l' || *fmt == 'z') {
			longs++;
			fmt++;
		}

		switch (*fmt) {
		case 'c':
			count += put((char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);

			while (*s && precision--)
				count += put(*s++);
			break;
		}
		case 'd':
		case 'i': {
			s64 v = longs ? va_arg(ap, long) : va_arg(ap, int);

			count += put_number(v < 0 ? -(u64)v : (u64)v, 10,
					    v < 0, width, pad);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = longs ? va_arg(ap, unsigned long)
				      : va_arg(ap, unsigned int);

			count += put_number(v, *fmt == 'x' ? 16 : 10, false,
					    width, pad);
			break;
		}
		case 'p':
			count += put('0') + put('x');
			count += put_number((u64)va_arg(ap, void *), 16, false,
					    width, pad);
			break;
		case '%':
			count += put('%');
			break;
		case '\0':		/* a lone '%' at the end */
			return count;
		default:		/* unknown: show it, as a hint */
			count += put('%') + put(*fmt);
			break;
		}
	}
	return count;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	int count;

	va_start(ap, fmt);
	count = vprintf(fmt, ap);
	va_end(ap);
	return count;
}
