"""The devices pylguest serves on the lguest bus, one module each:
block.py, console.py, net.py, rng.py (kvmtool keeps one file per device
too), and options.py, which turns the command line into devices.  Each is
a virtio.device.VirtioDevice; the console's host side is in hostconsole/.
"""
