/*
 * hypercall.h: talking to the launcher (docs/abi.md section 4).
 *
 * lguest guests used a hypercall instruction. Under KVM a `vmcall` never
 * leaves the kernel, so here a hypercall is an 8-byte store into the
 * hypercall page, an MMIO range with no memory behind it: every store
 * there exits to the launcher, which reads the offset (which call) and
 * the stored value (its argument).
 */
#ifndef GUEST_HYPERCALL_H
#define GUEST_HYPERCALL_H

#include "types.h"

#define LGUEST_HCALL_PAGE	0xFEB00000UL

#define LHCALL_NOTIFY		0x00	/* argument: a guest-physical address */
#define LHCALL_SHUTDOWN		0x08	/* bits 0-7 exit status, bit 8 reboot */

#define LHCALL_SHUTDOWN_REBOOT	0x100

static inline void hcall(unsigned long call, u64 arg)
{
	/* volatile: one 8-byte store, exactly once, never merged or elided */
	*(volatile u64 *)(LGUEST_HCALL_PAGE + call) = arg;
}

/*
 * NOTIFY: a device status change (addr = its descriptor), a virtqueue
 * kick (addr = the ring's pfn << 12), or, for any other address in RAM,
 * "print the NUL-terminated string there" (the early console).
 */
static inline void lhcall_notify(u64 addr)
{
	hcall(LHCALL_NOTIFY, addr);
}

/* Defined in hypercall.c, so that start.S can call them too. */
noreturn void lhcall_shutdown(unsigned int status);
noreturn void lhcall_reboot(unsigned int status);

#endif
