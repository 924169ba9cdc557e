/*
 * qemu_hello.S: the hello guest's equivalent for QEMU (hello_cost.py builds
 * it into bench/build/ with qemu_hello.ld: as --32, ld -m elf_i386).
 *
 * QEMU's -kernel boots an ELF with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY),
 * after its firmware (SeaBIOS and the pvh.bin option ROM on the pc machine,
 * qboot on microvm): the entry runs in 32-bit protected mode, flat
 * segments, no paging.  It prints two lines on COM1 (port 0x3f8), as
 * hello.elf prints its lines on pylguest's UART, then writes 0 to
 * isa-debug-exit's port 0xf4, which ends QEMU with exit status
 * (0 << 1) | 1 = 1.
 */
	.set	COM1, 0x3f8
	.set	DEBUG_EXIT, 0xf4

	.section .note.pvh, "a", @note
	.align	4
	.long	4			/* namesz: "Xen\0" */
	.long	4			/* descsz */
	.long	18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	_start

	.text
	.code32
	.globl	_start
_start:
	mov	$message, %esi
1:	lodsb
	test	%al, %al
	jz	2f
	mov	$COM1, %dx
	out	%al, %dx
	jmp	1b
2:	xor	%eax, %eax
	mov	$DEBUG_EXIT, %dx
	out	%eax, %dx
3:	hlt				/* not reached */
	jmp	3b

	.section .rodata
message:
	.ascii	"hello: a PVH guest on QEMU, printing on COM1\n"
	.asciz	"hello: exit 0\n"
