"""The host's side of the guest's console: where its output goes and
where its input comes from.  Both the UART and the virtio console use it.

  output.py          ConsoleOutput: a writer thread, back pressure, the tail
  terminal.py        raw mode, the Ctrl-A escapes, the input thread
  socket_console.py  --console socket:PATH: a Unix socket instead of stdio
  agent_channel.py   --agent fd:N: the agent's console, relayed losslessly
                     to a socket the test holds
"""
