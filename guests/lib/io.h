/*
 * io.h: x86 port I/O and the few privileged instructions guests need.
 *
 * Each `out` or `in` to a port the kernel does not handle itself is an
 * exit to the launcher and back: cheap to write, not cheap to run.
 */
#ifndef GUEST_IO_H
#define GUEST_IO_H

#include "types.h"

static inline void outb(u16 port, u8 value)
{
	asm volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 value;

	asm volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline void outw(u16 port, u16 value)
{
	asm volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline u16 inw(u16 port)
{
	u16 value;

	asm volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline void outl(u16 port, u32 value)
{
	asm volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline u32 inl(u16 port)
{
	u32 value;

	asm volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

/* Interrupt flag. The "memory" clobber keeps the compiler from moving
 * loads and stores of shared variables across these. */
static inline void cli(void)
{
	asm volatile("cli" : : : "memory");
}

static inline void sti(void)
{
	asm volatile("sti" : : : "memory");
}

/*
 * Wait for an interrupt with no window in which one can be lost: `sti`
 * takes effect only after the next instruction, so an interrupt that is
 * already pending is taken after `hlt` has started and wakes it, rather
 * than between the check the caller just made and the `hlt`.
 */
static inline void sti_hlt(void)
{
	asm volatile("sti; hlt" : : : "memory");
}

/* Stop for good: interrupts off, then halt (again, if an NMI wakes us). */
static inline noreturn void halt_forever(void)
{
	for (;;)
		asm volatile("cli; hlt" : : : "memory");
}

#endif
