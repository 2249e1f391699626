#!/usr/bin/env python3
"""Write seed inputs for the fuse_requests fuzz target: sessions of well-formed
FUSE requests, each framed as the target expects (u16 length, u16 reply room,
request bytes). Node 1 is the synthetic root; its entry "0" is the read-write
share, "1" the read-only one; the server numbers nodes from 2 and handles from 1."""
import os
import struct

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuse_requests")
os.makedirs(here, exist_ok=True)
uniq = [0]


def req(op, node, body=b""):
    uniq[0] += 1
    r = struct.pack("<IIQQIIII", 40 + len(body), op, uniq[0], node, 0, 0, 1, 0) + body
    return struct.pack("<HH", len(r), 0xFFFF) + r


def name(s):
    return s.encode() + b"\0"


INIT = req(26, 0, struct.pack("<IIII", 7, 31, 1 << 20, 0xFFFFFFFF))
LOOKUP0 = req(1, 1, name("0"))
sessions = {
    "read": [INIT, LOOKUP0, req(1, 2, name("file")), req(14, 3, struct.pack("<II", 0, 0)),
             req(15, 3, struct.pack("<QQI", 1, 0, 4096) + bytes(20))],
    "create-write": [INIT, LOOKUP0,
                     req(35, 2, struct.pack("<IIII", 0o102, 0o644, 0o22, 0) + name("new")),
                     req(16, 3, struct.pack("<QQI", 1, 0, 5) + bytes(20) + b"hello"),
                     req(18, 3, struct.pack("<QIIQ", 1, 0, 0, 0))],
    "dirs": [INIT, LOOKUP0, req(9, 2, struct.pack("<II", 0o755, 0) + name("d")),
             req(12, 2, struct.pack("<Q", 2) + name("d") + name("e")),
             req(27, 2, struct.pack("<II", 0, 0)),
             req(28, 2, struct.pack("<QQI", 1, 0, 4096) + bytes(20)),
             req(11, 2, name("e"))],
    "readonly-symlink": [INIT, req(1, 1, name("1")), req(1, 2, name("file")),
                         req(4, 3, struct.pack("<II", 1, 0) + bytes(56) + struct.pack("<I", 0o777) + bytes(16)),
                         LOOKUP0, req(1, 4, name("out")), req(5, 5),
                         req(6, 4, name("l") + name("/etc/passwd")),
                         req(42, 0, struct.pack("<II", 1, 0) + struct.pack("<QQ", 5, 1))],
}
for n, reqs in sessions.items():
    with open(os.path.join(here, n), "wb") as f:
        f.write(b"".join(reqs))
