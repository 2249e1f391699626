#!/usr/bin/env python3
"""Write seed inputs for the net_frames fuzz target: Ethernet frames as a guest sends them
(a DNS query over UDP, a TCP SYN, a UDP datagram elsewhere, an ARP request) and a bare DNS
query (the target also parses each input as one)."""
import os
import struct

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "net_frames")
os.makedirs(here, exist_ok=True)
GUEST, GATEWAY, DNS = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), bytes([10, 0, 2, 3])
ETH = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56]) + bytes([2, 0, 0, 0, 0, 1])


def ipv4(proto, src, dst, l4):
    h = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, src, dst)
    return ETH + b"\x08\x00" + h + l4


def udp(sport, dport, payload):
    return struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


def dns_query(name, qtype=1):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", qtype, 1)


seeds = {
    "dns-udp": ipv4(17, GUEST, DNS, udp(40000, 53, dns_query("example.com"))),
    "dns-aaaa": ipv4(17, GUEST, DNS, udp(40001, 53, dns_query("host.smolvm.internal", 28))),
    "udp": ipv4(17, GUEST, bytes([192, 0, 2, 7]), udp(40002, 123, bytes(48))),
    "tcp-syn": ipv4(6, GUEST, GATEWAY,
                    struct.pack(">HHIIBBHHH", 40003, 8080, 1, 0, 0x50, 0x02, 65535, 0, 0)),
    "arp": bytes([0xFF] * 6) + ETH[6:] + b"\x08\x06"
           + struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, ETH[6:], GUEST, bytes(6), GATEWAY),
    "dns-bare": dns_query("a.b.c"),
}
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
