//! Guest-supplied network bytes: each input is a frame the guest transmits through
//! virtio-net, and the same bytes as a DNS query. `classify` must never panic and every
//! payload it returns must lie inside the frame; a TCP SYN's ports and flags must be the
//! frame's own; a parsed DNS query must give a bounded answer; a UDP reply frame built from
//! it must classify back to the same datagram.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use smolvm::net::dns::{answer, parse_query, Rcode, MAX_NAME};
use smolvm::net::flows::{classify, udp_frame, Packet};

fuzz_target!(|data: &[u8]| {
    match classify(data) {
        Packet::Udp {
            src,
            src_port,
            dst,
            dst_port,
            payload,
        } => {
            let start = payload.as_ptr() as usize - data.as_ptr() as usize;
            assert!(start + payload.len() <= data.len());
            if let Some(f) = udp_frame((dst, dst_port), (src, src_port), [1; 6], [2; 6], payload) {
                assert_eq!(
                    classify(&f),
                    Packet::Udp {
                        src: dst,
                        src_port: dst_port,
                        dst: src,
                        dst_port: src_port,
                        payload
                    }
                );
            }
            if let Some(q) = parse_query(payload) {
                assert!(q.name.len() <= MAX_NAME);
                let a = answer(&q, Rcode::NoError, &[Ipv4Addr::LOCALHOST; 20]);
                assert!(a.len() <= 12 + q.question.len() + 16 * 16);
            }
        }
        Packet::TcpSyn {
            src_port,
            dst,
            dst_port,
        } => {
            // Ethernet header, then the IPv4 header (IHL words), then the segment.
            let tcp = &data[14 + usize::from(data[14] & 0xf) * 4..];
            assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), src_port);
            assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), dst_port);
            assert_eq!(dst, Ipv4Addr::new(data[30], data[31], data[32], data[33]));
            assert_eq!(tcp[13] & 0x12, 0x02, "SYN without ACK");
        }
        Packet::Other => {}
    }
    if let Some(q) = parse_query(data) {
        assert!(q.name.len() <= MAX_NAME);
    }
});
