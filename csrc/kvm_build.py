"""cffi build script: the KVM (and tap) structures and ioctls pylguest uses.

Everything that comes from <linux/kvm.h> is declared here, in one place,
and compiled against the real header (cffi's API mode): the ioctl numbers,
the exit reasons and the structure layouts are whatever the C compiler says
they are, never numbers computed by hand in Python.  A declaration ending in
`...;` lets the compiler fill in the padding and any fields we do not name.

The C written by hand is at the bottom: a thin ioctl wrapper (so every
call passes the argument with its real C type) and the signal handler that
makes Ctrl-C race-free with KVM_CAP_IMMEDIATE_EXIT; and run_fast.c, next to
this file, the run loop's fast path (the exits answered without Python).
"""

import os

import cffi

CSRC = os.path.dirname(os.path.abspath(__file__))

ffibuilder = cffi.FFI()

ffibuilder.cdef(r"""
/* ---- ioctls on /dev/kvm, a VM fd, a vCPU fd ---- */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
/* the rest of a vCPU's and a VM's state (kvm/state.py: what a snapshot
 * would have to hold; tools/kvm_state_probe.py asks this KVM for each) */
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_GET_TSC_KHZ ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...

/* ---- capabilities ---- */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_MEMSLOTS ...

/* ---- exit reasons ---- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_PIT_SPEAKER_DUMMY ...

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    ...;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};

struct kvm_cpuid2 {
    uint32_t nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
    ...;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    ...;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    uint32_t flags;
    ...;
};

/* State blobs read and written whole: the compiler gives their sizes. */
struct kvm_fpu { ...; };
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; ...; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };

/* struct kvm_run: only the fields the launcher reads.  The exit
 * information is an anonymous union in the header; cffi lets us name the
 * members we use and leave the rest to the compiler. */
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port;
                 uint32_t count; uint64_t data_offset; } io;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len;
                 uint8_t is_write; } mmio;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
    };
    ...;
};

/* ---- the tap device (net backend), from <linux/if_tun.h> ---- */
#define TUNSETIFF ...
#define TUNSETVNETHDRSZ ...
#define IFF_TAP ...
#define IFF_NO_PI ...
#define IFF_VNET_HDR ...
#define IFNAMSIZ ...
#define PYL_IFREQ_SIZE ...

/* ---- the hand-written C (bottom of this file) ---- */
int pyl_ioctl(int fd, unsigned long request, void *arg);
int pyl_ioctl_val(int fd, unsigned long request, unsigned long arg);
int pyl_run(int vcpu_fd);
int pyl_arm_stop_signals(struct kvm_run *run, int *signals, int count);
void pyl_disarm_stop_signals(void);
int pyl_stop_signal(void);
void pyl_request_stop(int signo);
void pyl_wake_vcpu(void);

/* ---- run_fast.c: the exits answered without Python ---- */
#define PYL_FAST_RING_SIZE ...
#define PYL_FAST_REASONS ...
struct pyl_fast {
    uint8_t claimed[...];
    uint16_t uart_base;
    uint8_t uart_thr_plain;
    uint8_t uart_lsr;
    uint32_t out_head;
    uint32_t out_tail;
    int32_t kick_fd;
    uint64_t answered[...];
    ...;
};
int pyl_run_fast(int vcpu_fd, struct kvm_run *run, struct pyl_fast *fp);
int pyl_fast_answer(struct pyl_fast *fp, struct kvm_run *run);
uint32_t pyl_fast_take(struct pyl_fast *fp, uint8_t *buf, uint32_t size);
""")

ffibuilder.set_source("pylguest._kvm", r"""
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <net/if.h>
#include <linux/if_tun.h>

#define PYL_IFREQ_SIZE sizeof(struct ifreq)

/* One wrapper per argument kind, so cffi passes each with its C type
 * (ioctl() itself is variadic). */
int pyl_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}

int pyl_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}

int pyl_run(int vcpu_fd)
{
    return ioctl(vcpu_fd, KVM_RUN, 0);
}

/*
 * Stopping a running vCPU without a race.
 *
 * A signal that arrives while the vCPU thread is inside KVM_RUN makes the
 * ioctl return EINTR.  But one that arrives just *before* the thread enters
 * KVM_RUN would be noticed only at the guest's next exit, which may be
 * never (a guest in `hlt` with interrupts off).  KVM_CAP_IMMEDIATE_EXIT
 * closes that window: the handler sets kvm_run->immediate_exit, and KVM_RUN
 * returns EINTR at once instead of entering the guest.
 *
 * Python's own signal handlers run later, between bytecodes of the main
 * thread, which is too late for this; so the handler is C.  If the signal
 * was delivered to another thread (a device backend), it is forwarded to
 * the vCPU thread so that thread's KVM_RUN is interrupted.
 */
static struct kvm_run *stop_run;
static pthread_t stop_thread;
static volatile sig_atomic_t stop_signo;
static int stop_signals[8];
static int stop_count;
static struct sigaction stop_saved[8];

static void stop_handler(int signo)
{
    int saved = errno;
    if (!stop_signo)
        stop_signo = signo;
    if (stop_run)
        stop_run->immediate_exit = 1;
    if (!pthread_equal(pthread_self(), stop_thread))
        pthread_kill(stop_thread, signo);
    errno = saved;
}

/*
 * A wake is not a stop: a pause (a snapshot, stop.py's StopRequest.pause)
 * needs the vCPU out of KVM_RUN for a moment and then back in.  So it
 * comes on a signal of its own, whose handler only sets immediate_exit
 * and records nothing.
 */
#define WAKE_SIGNAL SIGUSR2
static struct sigaction wake_saved;

static void wake_handler(int signo)
{
    (void)signo;
    if (stop_run)
        stop_run->immediate_exit = 1;
}

int pyl_arm_stop_signals(struct kvm_run *run, int *signals, int count)
{
    struct sigaction sa;
    int i;

    if (count > 8)
        return -EINVAL;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = wake_handler;
    sigemptyset(&sa.sa_mask);
    if (sigaction(WAKE_SIGNAL, &sa, &wake_saved) < 0)
        return -errno;
    sa.sa_handler = stop_handler;
    stop_run = run;
    stop_thread = pthread_self();
    stop_signo = 0;
    for (i = 0; i < count; i++) {
        if (sigaction(signals[i], &sa, &stop_saved[i]) < 0)
            return -errno;
        stop_signals[i] = signals[i];
        stop_count = i + 1;
    }
    return 0;
}

void pyl_disarm_stop_signals(void)
{
    int i;
    for (i = 0; i < stop_count; i++)
        sigaction(stop_signals[i], &stop_saved[i], NULL);
    if (stop_count)
        sigaction(WAKE_SIGNAL, &wake_saved, NULL);
    stop_count = 0;
    stop_run = NULL;
}

int pyl_stop_signal(void)
{
    return stop_signo;
}

/* Ask the vCPU to stop as if signal `signo` had arrived (timeouts, Ctrl-A x,
 * the Python API): callable from any thread. */
void pyl_request_stop(int signo)
{
    if (!stop_signo)
        stop_signo = signo;
    if (stop_run)
        stop_run->immediate_exit = 1;
    if (stop_count && !pthread_equal(pthread_self(), stop_thread))
        pthread_kill(stop_thread, stop_signals[0]);
}

/* Bring the vCPU thread out of KVM_RUN (EINTR) without asking for a stop:
 * the run loop then does what was asked of it (a pause) and runs on. */
void pyl_wake_vcpu(void)
{
    if (stop_run)
        stop_run->immediate_exit = 1;
    if (stop_count && !pthread_equal(pthread_self(), stop_thread))
        pthread_kill(stop_thread, WAKE_SIGNAL);
}

#include "run_fast.c"
""", include_dirs=[CSRC], depends=[os.path.join(CSRC, "run_fast.c")])

if __name__ == "__main__":
    ffibuilder.compile(tmpdir="build/cffi", verbose=False)
