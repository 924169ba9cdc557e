/*
 * irq.c: the IDT and the 8259 PICs.
 *
 * The entry code is gcc's __attribute__((interrupt)): the compiler saves
 * every register the handler touches and returns with `iretq`, so no
 * assembly is needed. That attribute requires -mgeneral-regs-only, which
 * we build with anyway (no SSE in guest kernel code: docs/abi.md,
 * section 7).
 */
#include "io.h"
#include "irq.h"

/* The two PICs: command and data ports of the master and the slave. */
#define PIC1_CMD	0x20
#define PIC1_DATA	0x21
#define PIC2_CMD	0xa0
#define PIC2_DATA	0xa1

#define PIC_ICW1_INIT	0x11	/* edge triggered, cascaded, ICW4 follows */
#define PIC_ICW4_8086	0x01
#define PIC_EOI		0x20	/* non-specific end of interrupt */
#define PIC_CASCADE_IRQ	2	/* the slave hangs off master line 2 */

/* A 64-bit IDT gate (Intel SDM vol. 3, 6.14.1). */
struct idt_gate {
	u16 offset_low;
	u16 selector;		/* code segment to run the handler in */
	u8  ist;		/* 0: stay on the current stack */
	u8  type;		/* present, DPL 0, 64-bit interrupt gate */
	u16 offset_mid;
	u32 offset_high;
	u32 reserved;
} packed;

#define GDT_KERNEL_CS		0x10	/* the launcher's GDT, as in Linux */
#define IDT_INTERRUPT_GATE	0x8e	/* interrupt gate: IF cleared on entry */

static struct idt_gate idt[IRQ_VECTOR_BASE + IRQ_LINES];
static irq_handler_t handlers[IRQ_LINES];
static u16 pic_mask = 0xffff;		/* bit n set: line n masked */

static void pic_write_mask(void)
{
	outb(PIC1_DATA, pic_mask & 0xff);
	outb(PIC2_DATA, pic_mask >> 8);
}

/* Called by every stub below, with interrupts off. */
static void irq_dispatch(unsigned int irq)
{
	if (handlers[irq])
		handlers[irq](irq);
	if (irq >= 8)
		outb(PIC2_CMD, PIC_EOI);
	outb(PIC1_CMD, PIC_EOI);	/* the master always, for the cascade */
}

/* One tiny entry point per line, so each knows which line it serves. */
struct interrupt_frame;
#define IRQ_STUB(n)							\
	__attribute__((interrupt))					\
	static void irq_stub_##n(struct interrupt_frame *frame)	\
	{								\
		(void)frame;						\
		irq_dispatch(n);					\
	}
IRQ_STUB(0)  IRQ_STUB(1)  IRQ_STUB(2)  IRQ_STUB(3)
IRQ_STUB(4)  IRQ_STUB(5)  IRQ_STUB(6)  IRQ_STUB(7)
IRQ_STUB(8)  IRQ_STUB(9)  IRQ_STUB(10) IRQ_STUB(11)
IRQ_STUB(12) IRQ_STUB(13) IRQ_STUB(14) IRQ_STUB(15)

static void (*const stubs[IRQ_LINES])(struct interrupt_frame *) = {
	irq_stub_0,  irq_stub_1,  irq_stub_2,  irq_stub_3,
	irq_stub_4,  irq_stub_5,  irq_stub_6,  irq_stub_7,
	irq_stub_8,  irq_stub_9,  irq_stub_10, irq_stub_11,
	irq_stub_12, irq_stub_13, irq_stub_14, irq_stub_15,
};

static void idt_set_gate(unsigned int vector, void *handler)
{
	u64 addr = (u64)handler;

	idt[vector] = (struct idt_gate){
		.offset_low = addr & 0xffff,
		.selector = GDT_KERNEL_CS,
		.type = IDT_INTERRUPT_GATE,
		.offset_mid = (addr >> 16) & 0xffff,
		.offset_high = addr >> 32,
	};
}

/*
 * The PIC's four initialization command words, for each chip:
 * ICW1 starts the sequence, ICW2 is the vector of line 0, ICW3 wires the
 * cascade (master: which line has a slave; slave: its id), ICW4 selects
 * 8086 mode. Then mask everything; irq_register() unmasks.
 */
static void pic_init(void)
{
	outb(PIC1_CMD, PIC_ICW1_INIT);
	outb(PIC2_CMD, PIC_ICW1_INIT);
	outb(PIC1_DATA, IRQ_VECTOR_BASE);
	outb(PIC2_DATA, IRQ_VECTOR_BASE + 8);
	outb(PIC1_DATA, 1 << PIC_CASCADE_IRQ);
	outb(PIC2_DATA, PIC_CASCADE_IRQ);
	outb(PIC1_DATA, PIC_ICW4_8086);
	outb(PIC2_DATA, PIC_ICW4_8086);
	pic_write_mask();
}

void irq_init(void)
{
	struct {
		u16 limit;
		u64 base;
	} packed idtr = { sizeof(idt) - 1, (u64)idt };
	unsigned int i;

	for (i = 0; i < IRQ_LINES; i++)
		idt_set_gate(IRQ_VECTOR_BASE + i, stubs[i]);
	asm volatile("lidt %0" : : "m"(idtr));
	pic_init();
}

void irq_register(unsigned int irq, irq_handler_t handler)
{
	if (irq >= IRQ_LINES)
		return;
	handlers[irq] = handler;
	pic_mask &= ~(1u << irq);
	if (irq >= 8)
		pic_mask &= ~(1u << PIC_CASCADE_IRQ);
	pic_write_mask();
}
