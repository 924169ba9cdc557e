"""The run: from the first KVM_RUN to the Stop that ends it.

    loop.py      KVM_RUN and an answer to every exit; each handler returns
                 None (run on) or the Stop that ends the run
    fastpath.py  the port exits C answers without Python (csrc/run_fast.c),
                 given to the loop by the machine, or not (--trace)
    stop.py      every way a run ends (Stop, its exit status) and the one
                 way to ask for the end from outside the loop (StopRequest)
    policy.py    what may ask: the stop signals, --timeout, Ctrl-A x
    emulate.py   the instructions an emulating KVM refuses, finished here
    trace.py     --trace: one decoded line per exit

The stop protocol is one thing with two doors.  Inside the loop, an exit's
handler (the port bus's devices, the hypercall page, the lguest bus)
returns its verdict, a Stop or None, and the loop returns the first Stop.
Outside it -- a signal, the timer, the input thread, the Python API --
StopRequest.request(stop) records the stop and takes the vCPU out of
KVM_RUN, and the loop returns that Stop.  No handler uses the second door.
"""
