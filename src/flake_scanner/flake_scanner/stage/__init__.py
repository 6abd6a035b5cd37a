"""XYZ stage: the ASI MS-2000 serial protocol, a pyserial driver and an emulator on a pty."""
