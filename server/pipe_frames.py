"""Whole messages from the read end of a multiprocessing pipe, without ever blocking.

The server reads the engine process's reports on its event loop. uvloop, which uvicorn runs on when it
is installed (as in the Docker image), makes every file descriptor it watches non-blocking. Then
Connection.recv_bytes, which reads a message's length and loops until its body is in, raises
BlockingIOError whenever a report is still half written: a large one, or any one written while the
loop was busy elsewhere and the pipe filled up. `FrameReader` takes what the pipe holds, keeps a partial
message for the next wake-up, and cuts whole ones at Connection.send_bytes's framing: a 4-byte big-endian
signed length, or -1 and an 8-byte length for messages of 2 GiB and more.
"""

from __future__ import annotations

import os
import struct

LENGTH = struct.Struct("!i")
LONG_LENGTH = struct.Struct("!Q")
READ_SIZE = 1 << 20  # bytes per wake-up at most, so that one busy pipe cannot starve the event loop


class FrameReader:
    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self.fd = fd
        self.closed = False  # the pipe ended (its writer closed, or the descriptor failed)
        self._buffer = bytearray()

    def read(self) -> list[bytes]:
        """The whole messages that have arrived since the last call, oldest first (perhaps none). A message
        cut short by the end of the pipe is dropped."""
        try:
            chunk = os.read(self.fd, READ_SIZE)
        except BlockingIOError:  # woken up with nothing to read
            return []
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return []
        self._buffer += chunk
        return self._whole_messages()

    def _whole_messages(self) -> list[bytes]:
        messages, at, buffer = [], 0, self._buffer
        while len(buffer) - at >= LENGTH.size:
            (size,), start = LENGTH.unpack_from(buffer, at), at + LENGTH.size
            if size == -1:
                if len(buffer) - start < LONG_LENGTH.size:
                    break
                (size,), start = LONG_LENGTH.unpack_from(buffer, start), start + LONG_LENGTH.size
            if len(buffer) - start < size:
                break
            messages.append(bytes(buffer[start : start + size]))
            at = start + size
        del buffer[:at]
        return messages
