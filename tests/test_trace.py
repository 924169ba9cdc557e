"""--trace: one decoded line per exit."""

from conftest import guest_path
from pylguest import Guest


def test_trace_decodes_uart_and_hypercalls(kvm_available):
    with Guest(guest_path("hello"), cmdline="exit=5", timeout=30, trace=True) as guest:
        assert guest.wait() == 5
    trace = guest.stderr
    assert "start: ELF, entry 0x" in trace
    assert "io  in  0x3fd uart.LSR -> 0x60" in trace
    assert "io  out 0x3f8 uart.THR/RBR = 0x68 'h'" in trace
    assert "mmio write 0xfeb00008 LHCALL_SHUTDOWN(status 5)" in trace
    assert "stop: shutdown (exit status 5)" in trace
