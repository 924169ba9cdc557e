/*
 * uart.h: the 8250 serial port at COM1, our console.
 *
 * Output works as in Linux's early console (arch/x86/boot/early_serial_
 * console.c): wait until the transmit holding register is empty, then
 * write the byte. The launcher's UART is always ready, so the wait costs
 * one read of LSR.
 */
#ifndef GUEST_UART_H
#define GUEST_UART_H

#include "types.h"

#define UART_COM1	0x3f8
#define UART_IRQ	4	/* COM1's ISA interrupt line */

/* Register offsets from the base port. */
#define UART_RBR	0	/* read: receive buffer */
#define UART_THR	0	/* write: transmit holding */
#define UART_IER	1	/* interrupt enable */
#define UART_IIR	2	/* read: interrupt identification */
#define UART_FCR	2	/* write: FIFO control */
#define UART_LCR	3	/* line control */
#define UART_MCR	4	/* modem control */
#define UART_LSR	5	/* line status */

#define UART_IER_RDI	0x01	/* interrupt when received data is ready */
#define UART_LCR_8N1	0x03	/* 8 data bits, no parity, 1 stop bit */
#define UART_MCR_DTR	0x01
#define UART_MCR_RTS	0x02
#define UART_MCR_OUT2	0x08	/* on a PC, connects the UART's IRQ output */
#define UART_LSR_DR	0x01	/* data ready: RBR holds a byte */
#define UART_LSR_THRE	0x20	/* THR empty: we may write the next byte */

/* One byte, exactly as given. */
void uart_putc(char c);

/* A string; '\n' goes out as "\r\n", as Linux's early console sends it. */
void uart_puts(const char *s);

/* n bytes of s, with the same '\n' rule (for strings without a NUL). */
void uart_write(const char *s, size_t n);

/* A received byte, or -1 if there is none (LSR.DR clear). */
int uart_getc(void);

/* Raise IRQ 4 whenever a byte arrives (the caller routes the IRQ). */
void uart_enable_rx_interrupt(void);

#endif
