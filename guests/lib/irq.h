/*
 * irq.h: legacy interrupts through the 8259 PIC pair.
 *
 * The launcher's VM has KVM's in-kernel PIC and IOAPIC. The PIC is the
 * simplest route from a device's IRQ line to our CPU: remap its 16 lines
 * to vectors 0x20-0x2f (away from the CPU's exception vectors), point
 * those IDT gates at handlers, unmask the lines we want, and `sti`.
 *
 * Only vectors 0x20-0x2f have gates. Any exception therefore cannot be
 * delivered, becomes a double fault, then a triple fault, which the
 * launcher reports with the registers: the crudest debugger there is.
 */
#ifndef GUEST_IRQ_H
#define GUEST_IRQ_H

#include "types.h"

#define IRQ_VECTOR_BASE	0x20	/* IRQ n arrives as vector 0x20 + n */
#define IRQ_LINES	16

typedef void (*irq_handler_t)(unsigned int irq);

/* Remap and mask both PICs, load our IDT. Interrupts stay off. */
void irq_init(void);

/* Call handler (with interrupts off) for every interrupt on this line,
 * and unmask the line. The end-of-interrupt is sent after it returns. */
void irq_register(unsigned int irq, irq_handler_t handler);

#endif
