/*
 * start.S: the first instructions a teaching guest runs.
 *
 * The launcher enters us the way Linux's 64-bit boot protocol enters a
 * kernel (Documentation/x86/boot.rst, "64-bit boot protocol"):
 *   - long mode, paging on, the first 4 GiB identity mapped;
 *   - %cs = 0x10 (64-bit code), the data segments 0x18, GDT at 0x500;
 *   - interrupts off;
 *   - %rsi = guest-physical address of struct boot_params (0x7000).
 * Nothing promises a usable stack, so the only job here is to make the
 * world C expects: a stack, a zeroed .bss, and then guest_main(bp).
 * Whatever guest_main returns becomes the launcher's exit status.
 */

	.section .text.start, "ax"
	.globl	_start
	.type	_start, @function
_start:
	cld				/* C assumes string ops go upwards */
	movq	%rsi, %rbx		/* keep boot_params: %rbx survives calls */

	/* Our own stack: the top of boot_stack, below, 16-byte aligned. */
	leaq	boot_stack_top(%rip), %rsp

	/* Zero .bss, 8 bytes at a time (guest.ld aligns both ends to 16). */
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq

	/* return guest_main(bp) -> LHCALL_SHUTDOWN with that status */
	movq	%rbx, %rdi
	call	guest_main
	movl	%eax, %edi
	call	lhcall_shutdown		/* does not return */
	.size	_start, . - _start

	.section .bss
	.balign	16
boot_stack:
	.skip	16384
boot_stack_top:

	/* No executable stack wanted: keep the linker quiet about it. */
	.section .note.GNU-stack, "", @progbits
