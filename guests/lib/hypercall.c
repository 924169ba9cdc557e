/* hypercall.c: the two ways to ask the launcher to stop us. */
#include "hypercall.h"
#include "io.h"

noreturn void lhcall_shutdown(unsigned int status)
{
	hcall(LHCALL_SHUTDOWN, status & 0xff);
	/* The launcher does not resume us; if it did, stay stopped. */
	halt_forever();
}

noreturn void lhcall_reboot(unsigned int status)
{
	hcall(LHCALL_SHUTDOWN, LHCALL_SHUTDOWN_REBOOT | (status & 0xff));
	halt_forever();
}
