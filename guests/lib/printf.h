/*
 * printf.h: a small printf onto the UART.
 *
 * Conversions: %c %s %d %i %u %x %p %%, with an optional '0' flag, a
 * width, a precision for %s (%.*s prints a string that has no NUL), and
 * the length modifiers l, ll, z. Nothing else (no floats: the
 * guests are built without SSE or x87). Newlines go out as "\r\n".
 */
#ifndef GUEST_PRINTF_H
#define GUEST_PRINTF_H

#include <stdarg.h>

__attribute__((format(printf, 1, 2)))
int printf(const char *fmt, ...);

int vprintf(const char *fmt, va_list ap);

#endif
