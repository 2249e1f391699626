//! Guest-supplied network bytes: each input is a frame the guest transmits through
//! virtio-net, and the same bytes as a DNS query. `classify` must never panic and every
//! payload it returns must lie inside the frame; a parsed DNS query must give a bounded
//! answer; a UDP reply frame built from it must classify back to the same datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm::net::dns::{answer, parse_query, Rcode, MAX_NAME};
use smolvm::net::flows::{classify, udp_frame, Packet};

fuzz_target!(|data: &[u8]| {
    if let Packet::Udp {
        src,
        src_port,
        dst,
        dst_port,
        payload,
    } = classify(data)
    {
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
            let a = answer(&q, Rcode::NoError, &[std::net::Ipv4Addr::LOCALHOST; 20]);
            assert!(a.len() <= 12 + q.question.len() + 16 * 16);
        }
    }
    if let Some(q) = parse_query(data) {
        assert!(q.name.len() <= MAX_NAME);
    }
});
