/* uart.c: polled output and input on COM1. */
#include "io.h"
#include "uart.h"

void uart_putc(char c)
{
	while (!(inb(UART_COM1 + UART_LSR) & UART_LSR_THRE))
		;
	outb(UART_COM1 + UART_THR, c);
}

void uart_write(const char *s, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		if (s[i] == '\n')
			uart_putc('\r');
		uart_putc(s[i]);
	}
}

void uart_puts(const char *s)
{
	while (*s) {
		if (*s == '\n')
			uart_putc('\r');
		uart_putc(*s++);
	}
}

int uart_getc(void)
{
	if (!(inb(UART_COM1 + UART_LSR) & UART_LSR_DR))
		return -1;
	return inb(UART_COM1 + UART_RBR);
}

void uart_enable_rx_interrupt(void)
{
	/*
	 * A virtual UART has no baud rate, so we leave the divisor alone and
	 * only set the line format. OUT2 is what gates the UART's interrupt
	 * onto the ISA bus on a real PC; Linux sets it, so do we.
	 */
	outb(UART_COM1 + UART_LCR, UART_LCR_8N1);
	outb(UART_COM1 + UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2);
	outb(UART_COM1 + UART_IER, UART_IER_RDI);
}
