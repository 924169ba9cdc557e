"""The PC platform devices a guest reaches through port I/O exits.

  ports.py   the port bus: which device answers which port
  uart.py    an 8250 UART on COM1 (the console before the virtio console)
  i8042.py   the keyboard controller's reset line (0xFE to port 0x64)
"""
