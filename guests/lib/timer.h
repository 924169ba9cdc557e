/*
 * timer.h: a clock for bounded waits, from the 8254 PIT.
 *
 * A guest waiting for a device sleeps in `hlt` until an interrupt. If the
 * device never answers, only another interrupt can wake it to notice, so
 * we keep one ticking: PIT channel 0 raises IRQ 0 a hundred times a
 * second. The launcher's PIT lives in the kernel (KVM_CREATE_PIT2), so
 * the ticks cost no exits to the launcher.
 *
 * The ticks also make "poll the used ring" work with a device's own
 * interrupts suppressed: every tick wakes the waiter for another look.
 */
#ifndef GUEST_TIMER_H
#define GUEST_TIMER_H

#include "types.h"

#define TIMER_HZ	100

/* Program the PIT and take IRQ 0 (irq_init() must have run). Interrupts
 * stay off until the caller enables them (sti, or sti_hlt). */
void timer_init(void);

/* Milliseconds since timer_init(), in steps of 1000 / TIMER_HZ. */
u64 timer_ms(void);

#endif
