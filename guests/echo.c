/*
 * echo.c: serial input, driven by interrupts.
 *
 * The UART raises IRQ 4 when a byte arrives; the PIC turns that into
 * vector 0x24; our handler drains the receive buffer and echoes each byte
 * in upper case, so whoever types can tell the guest really saw it. The
 * main loop does nothing but sleep in `hlt` until 'q' arrives.
 *
 * Output: "echo: ready" once the interrupt path is set up, the echoes,
 * then "echo: bye" on a line of its own after 'q'. Status 0.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/irq.h"
#include "lib/printf.h"
#include "lib/uart.h"

static volatile bool quit;		/* set by the handler, read by main */
static bool mid_line;			/* echoed bytes since the last newline */

static void echo_byte(char c)
{
	if (c == '\r') {		/* a terminal's Enter */
		uart_putc('\r');
		uart_putc('\n');
		mid_line = false;
		return;
	}
	if (c >= 'a' && c <= 'z')
		c -= 'a' - 'A';
	uart_putc(c);
	mid_line = (c != '\n');
}

static void uart_interrupt(unsigned int irq)
{
	int c;

	(void)irq;
	/* Drain everything: one interrupt may stand for several bytes. */
	while ((c = uart_getc()) >= 0) {
		if (c == 'q') {
			quit = true;
			break;		/* the rest is not ours to read */
		}
		echo_byte(c);
	}
}

int guest_main(struct boot_params *bp)
{
	(void)bp;

	irq_init();
	irq_register(UART_IRQ, uart_interrupt);
	uart_enable_rx_interrupt();
	printf("echo: ready\n");

	/*
	 * Check the flag with interrupts off, then sleep: sti_hlt() cannot
	 * miss an interrupt that arrives between the check and the hlt.
	 */
	for (;;) {
		cli();
		if (quit)
			break;
		sti_hlt();
	}

	printf("%secho: bye\n", mid_line ? "\n" : "");
	return 0;
}
