"""The run loop (run/loop.py), driven by a fake vCPU through every exit kind.

No /dev/kvm: tests/fake_vcpu.py plays KVM's side of struct kvm_run.  Each
test runs twice: through the Python handlers alone, and with the C fast
path (csrc/run_fast.c) answering first what it may; the verdicts, the
answers and the counts must not differ.
"""

import pytest
from fake_vcpu import (RECORDER_PORT, SYSTEM_EVENT_SHUTDOWN, Recorder, interrupted, io_answer,
                       io_in, io_out, look, mmio, mmio_answer, plain, refused, rigs,
                       shutdown_hypercall, system_event)

from pylguest import layout
from pylguest.run import stop
from pylguest._native import lib
from pylguest.lguest.hypercall import LHCALL_NOTIFY
from pylguest.run.stop import EXIT_LAUNCHER_ERROR


@pytest.fixture(params=["python", "fast"])
def rig_of(request):
    yield from rigs(fast=request.param == "fast")


# --- each exit kind ---------------------------------------------------------------------

def test_a_byte_out_reaches_its_port_and_the_run_goes_on(rig_of):
    rig = rig_of([io_out(RECORDER_PORT + 5, b"\x41"), io_out(0x80, b"\x99"),   # 0x80: unclaimed
                  shutdown_hypercall(3)])
    assert rig.run() == stop.shutdown(3)
    assert rig.recorder.written == [(5, 0x41)]
    assert rig.loop.exit_counts == {lib.KVM_EXIT_IO: 2, lib.KVM_EXIT_MMIO: 1}


def test_a_string_out_writes_every_item_and_the_first_stop_wins(rig_of):
    rig = rig_of([io_out(RECORDER_PORT, bytes([1, 7, 2, 9]))],
                 recorder=Recorder(stop_on=7))
    assert rig.run() == stop.shutdown(7)
    assert rig.recorder.written == [(0, 1), (0, 7), (0, 2), (0, 9)]


def test_a_wide_out_is_one_value_of_its_size(rig_of):
    rig = rig_of([io_out(RECORDER_PORT, b"\x34\x12\x78\x56", size=2), shutdown_hypercall(0)])
    rig.run()
    assert rig.recorder.written == [(0, 0x1234), (0, 0x5678)]


def test_an_in_gets_its_answer_in_kvm_run_for_every_item(rig_of):
    answers = []
    rig = rig_of([io_in(RECORDER_PORT + 1, size=1, count=3), look(io_answer(3), answers),
                  shutdown_hypercall(0)])
    rig.run()
    assert answers == [bytes([0x41, 0x42, 0x43])]


def test_an_unclaimed_port_reads_as_all_ones(rig_of):
    answers = []
    rig = rig_of([io_in(0x2F8, size=2, count=1), look(io_answer(2), answers),
                  shutdown_hypercall(0)])
    rig.run()
    assert answers == [b"\xff\xff"]


def test_mmio_outside_the_hypercall_page_reads_ones_and_ignores_stores(rig_of):
    seen = []
    rig = rig_of([mmio(0xFEE00000, length=4), look(mmio_answer(4), seen),
                  mmio(0xFEE00000, b"\x01\x02\x03\x04"),
                  mmio(layout.HYPERCALL_PAGE, length=8), look(mmio_answer(8), seen),
                  shutdown_hypercall(5)])
    assert rig.run() == stop.shutdown(5)
    assert seen == [b"\xff" * 4, bytes(8)]             # the hypercall page reads as zeros
    assert rig.reports == []


def test_a_notify_of_a_string_is_the_early_console(rig_of):
    rig = rig_of([mmio(layout.HYPERCALL_PAGE + LHCALL_NOTIFY, (0x2000).to_bytes(8, "little")),
                  shutdown_hypercall(0)])
    rig.memory.write(0x2000, b"early words\0")
    rig.run()
    assert bytes(rig.early) == b"early words"


def test_the_i8042_reset_line_ends_the_run_as_a_reboot(rig_of):
    rig = rig_of([io_out(0x64, b"\xfe")])
    result = rig.run()
    assert (result.reason, result.status) == ("reboot", 0)


def test_a_triple_fault_stops_with_the_registers(rig_of):
    rig = rig_of([plain(lib.KVM_EXIT_SHUTDOWN)])
    result = rig.run()
    assert result.status == stop.EXIT_GUEST_CRASH
    assert "rip=0x1000" in result.detail and "efer=0x500" in result.detail


def test_a_refused_instruction_is_completed_and_the_run_goes_on(rig_of):
    rig = rig_of([refused(b"\x0f\x01\xcb"), shutdown_hypercall(0)])       # STAC
    assert rig.run() == stop.shutdown(0)
    assert rig.vcpu.regs.rip == 0x1003 and rig.vcpu.regs.rflags & (1 << 18)


def test_an_unknown_refused_instruction_stops_with_its_bytes(rig_of):
    rig = rig_of([refused(b"\x0f\x0b")])                                   # UD2
    result = rig.run()
    assert result.status == EXIT_LAUNCHER_ERROR
    assert "[0f 0b]" in result.detail and "rip=0x1000" in result.detail
    rig = rig_of([refused(b"\x0f\x01\xcb", flags=0)])                      # no bytes given
    assert "[unknown]" in rig.run().detail


@pytest.mark.parametrize("kind, expected", [
    (lib.KVM_SYSTEM_EVENT_RESET, ("reboot", 0)),
    (SYSTEM_EVENT_SHUTDOWN, ("shutdown", 0)),
])
def test_a_system_event(rig_of, kind, expected):
    result = rig_of([system_event(kind)]).run()
    assert (result.reason, result.status) == expected


def test_a_failed_entry_names_the_hardware_reason(rig_of):
    def fill(run):
        run.fail_entry.hardware_entry_failure_reason = 0x21
    result = rig_of([plain(lib.KVM_EXIT_FAIL_ENTRY, fill)]).run()
    assert result.status == EXIT_LAUNCHER_ERROR and "0x21" in result.detail


def test_a_hlt_exit_is_a_halt_for_good(rig_of):
    result = rig_of([plain(lib.KVM_EXIT_HLT)]).run()
    assert (result.reason, result.status) == ("halted", EXIT_LAUNCHER_ERROR)


def test_an_unknown_exit_reason_stops_with_it(rig_of):
    result = rig_of([plain(lib.KVM_EXIT_INTR), plain(4242)]).run()
    assert result.status == EXIT_LAUNCHER_ERROR
    assert "unhandled KVM exit reason 4242" in result.detail


def test_an_interruption_ends_the_run_with_the_stop_asked_for(rig_of):
    rig = rig_of([interrupted])
    wanted = stop.timeout(5)
    rig.stopping.request(wanted)
    assert rig.run() == wanted


def test_an_interruption_by_a_stop_signal_ends_the_run_with_it(rig_of):
    rig = rig_of([interrupted, shutdown_hypercall(0)])
    rig.signals.append(stop.signal_stop(15, "SIGTERM"))
    assert rig.run().status == 143


def test_an_interruption_with_nothing_asked_runs_on(rig_of):
    rig = rig_of([interrupted, interrupted, shutdown_hypercall(9)])
    assert rig.run() == stop.shutdown(9)
    assert rig.loop.exit_counts[None] == 2
    summary = rig.loop.exit_summary()
    assert summary.startswith("exits to userspace: 3 (") and "interrupted 2" in summary


