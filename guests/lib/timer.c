/* timer.c: PIT channel 0 as a 100 Hz tick on IRQ 0. */
#include "io.h"
#include "irq.h"
#include "timer.h"

#define PIT_CHANNEL0	0x40
#define PIT_COMMAND	0x43
#define PIT_HZ		1193182		/* the PIT's input clock */
#define PIT_IRQ		0

/* Command byte: channel 0, low byte then high byte, mode 2 (rate
 * generator: one pulse every `divisor` input clocks, forever), binary. */
#define PIT_CH0_LOHI_RATE	0x34

static volatile u64 ticks;		/* written by the handler only */

static void timer_interrupt(unsigned int irq)
{
	(void)irq;
	ticks++;
}

void timer_init(void)
{
	u16 divisor = (PIT_HZ + TIMER_HZ / 2) / TIMER_HZ;

	outb(PIT_COMMAND, PIT_CH0_LOHI_RATE);
	outb(PIT_CHANNEL0, divisor & 0xff);
	outb(PIT_CHANNEL0, divisor >> 8);
	irq_register(PIT_IRQ, timer_interrupt);
}

u64 timer_ms(void)
{
	return ticks * (1000 / TIMER_HZ);
}
