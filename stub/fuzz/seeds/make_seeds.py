#!/usr/bin/env python3
"""Write seed inputs for the virtio_requests fuzz target: one well-formed request
per device, laid out as the target expects (selector byte, then guest memory
from address 0; queue i has its table at 0x1000*i, avail +0x100, used +0x200)."""
import os
import struct

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "virtio_requests")
os.makedirs(here, exist_ok=True)
NEXT, WRITE = 1, 2


def queue(mem, base, chain):
    for i, (addr, length, flags) in enumerate(chain):
        if i + 1 < len(chain):
            flags |= NEXT
        struct.pack_into("<QIHH", mem, base + 16 * i, addr, length, flags, i + 1)
    struct.pack_into("<HHH", mem, base + 0x100, 0, 1, 0)


def seed(name, sel, queues):
    mem = bytearray(0x3000)
    for q, (chain, extra) in enumerate(queues):
        queue(mem, 0x1000 * q, chain)
        for addr, data in extra:
            mem[addr:addr + len(data)] = data
    with open(os.path.join(here, name), "wb") as f:
        f.write(bytes([sel]) + bytes(mem))


blk_read = ([(0x400, 16, 0), (0x800, 512, WRITE), (0xa00, 1, WRITE)],
            [(0x400, struct.pack("<IIQ", 0, 0, 1))])
blk_write = ([(0x400, 16, 0), (0x800, 1024, 0), (0xc00, 1, WRITE)],
             [(0x400, struct.pack("<IIQ", 1, 0, 3))])
seed("blk-read", 0x00, [blk_read])
seed("blk-write-event-idx", 0x80, [blk_write])
seed("console", 0x01, [([(0x2400, 64, WRITE)], []),
                       ([(0x2800, 5, 0)], [(0x2800, b"hello")])])
seed("rng", 0x02, [([(0x400, 64, WRITE)], [])])
