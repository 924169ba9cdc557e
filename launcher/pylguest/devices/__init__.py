"""The devices pylguest serves on the lguest bus, one module each:
console.py, block.py, net.py, rng.py (kvmtool keeps one file per device too).
Each is a virtio.device.VirtioDevice."""
