"""Find the QEMU process behind a QMP unix socket (SO_PEERCRED).

The user names only the socket; the memory backends need the PID.  Peer
credentials come from the kernel, so they cannot be spoofed by a stale pidfile.
"""

from __future__ import annotations

import socket
import struct

_UCRED = struct.Struct("3i")


def peer_pid(sock: socket.socket) -> int:
    """PID of the process at the other end of a connected AF_UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, _uid, _gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise OSError("SO_PEERCRED returned no PID for the QMP socket")
    return int(pid)
