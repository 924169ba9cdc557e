"""The host's side of the agent channel (docs/abi.md, section 8).

  protocol.py  the frames: building the host's, reading and checking the agent's
  session.py   Session: commands and file copies over one channel, any
               number at a time, each bounded in time and in host memory

The launcher itself never reads the channel (hostconsole/agent_channel.py
relays its bytes); these run in the test's process, behind pylguest.Guest.
"""
