//! Guest frames classified before the TCP/IP stack sees them, UDP frames built for the
//! guest, and the bounded flow table that maps guest flows to host sockets.
//!
//! [`classify`] reads guest-supplied bytes: every length and offset is checked against the
//! frame, and anything unexpected is [`Packet::Other`] (handed to the stack, which parses it
//! again and drops what it does not like). Property-tested here and fuzzed by the
//! `net_frames` target.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// What a guest frame is, as far as the NAT cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A UDP datagram (unfragmented IPv4).
    Udp {
        /// Guest address.
        src: Ipv4Addr,
        /// Guest port.
        src_port: u16,
        /// Destination address as the guest sent it.
        dst: Ipv4Addr,
        /// Destination port.
        dst_port: u16,
        /// The datagram's payload.
        payload: &'a [u8],
    },
    /// A TCP segment opening a connection (SYN without ACK).
    TcpSyn {
        /// Guest port.
        src_port: u16,
        /// Destination address as the guest sent it.
        dst: Ipv4Addr,
        /// Destination port.
        dst_port: u16,
    },
    /// Anything else: ARP, other TCP segments, ICMP, fragments, malformed frames.
    Other,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Classify one Ethernet frame from the guest.
pub fn classify(frame: &[u8]) -> Packet<'_> {
    classify_inner(frame).unwrap_or(Packet::Other)
}

fn classify_inner(frame: &[u8]) -> Option<Packet<'_>> {
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_HDR..)?;
    let vihl = *ip.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0xf) * 4;
    let total = usize::from(be16(ip, 2)?);
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    // Fragments (MF set or an offset) go to the stack, which drops them.
    if be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    match proto {
        PROTO_UDP => {
            let len = usize::from(be16(l4, 4)?);
            if len < 8 || len > l4.len() {
                return None;
            }
            Some(Packet::Udp {
                src,
                src_port: be16(l4, 0)?,
                dst,
                dst_port: be16(l4, 2)?,
                payload: &l4[8..len],
            })
        }
        PROTO_TCP => {
            let flags = *l4.get(13)?;
            let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
            (syn && !ack).then_some(Packet::TcpSyn {
                src_port: be16(l4, 0)?,
                dst,
                dst_port: be16(l4, 2)?,
            })
        }
        _ => None,
    }
}

fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Largest UDP payload put in one frame to the guest (MTU 1500 less IPv4 and UDP headers);
/// longer datagrams from the host are dropped (no fragmentation).
pub const MAX_UDP_PAYLOAD: usize = 1500 - 20 - 8;

/// An Ethernet frame carrying a UDP datagram from `src` to the guest, or `None` when the
/// payload does not fit one frame.
pub fn udp_frame(
    (src, src_port): (Ipv4Addr, u16),
    (dst, dst_port): (Ipv4Addr, u16),
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    payload: &[u8],
) -> Option<Vec<u8>> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return None;
    }
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut f = Vec::with_capacity(ETH_HDR + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let ip_sum = checksum_fold(checksum_add(0, &f[ip_start..ip_start + 20]));
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_start = f.len();
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, PROTO_UDP]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let mut sum = checksum_fold(checksum_add(checksum_add(0, &pseudo), &f[udp_start..]));
    if sum == 0 {
        sum = 0xffff;
    }
    f[udp_start + 6..udp_start + 8].copy_from_slice(&sum.to_be_bytes());
    Some(f)
}

/// A bounded map from flows to their host side: at most `max` entries (inserting one more
/// evicts the least recently used), and entries idle longer than `idle` expire.
pub struct FlowTable<K, V> {
    map: HashMap<K, (V, Instant)>,
    max: usize,
    idle: Duration,
}

impl<K: Eq + Hash + Clone, V> FlowTable<K, V> {
    /// An empty table.
    pub fn new(max: usize, idle: Duration) -> Self {
        FlowTable {
            map: HashMap::new(),
            max: max.max(1),
            idle,
        }
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The flow of `k`, marked used at `now`.
    pub fn get_mut(&mut self, k: &K, now: Instant) -> Option<&mut V> {
        self.map.get_mut(k).map(|(v, t)| {
            *t = now;
            v
        })
    }

    /// Add a flow; returns the one evicted to make room, if any.
    pub fn insert(&mut self, k: K, v: V, now: Instant) -> Option<(K, V)> {
        let mut evicted = None;
        if !self.map.contains_key(&k) && self.map.len() >= self.max {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                evicted = self.map.remove(&oldest).map(|(v, _)| (oldest, v));
            }
        }
        self.map.insert(k, (v, now));
        evicted
    }

    /// Remove a flow.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.map.remove(k).map(|(v, _)| v)
    }

    /// Remove and return the flows idle since before `now - idle`.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, V)> {
        let dead: Vec<K> = self
            .map
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) > self.idle)
            .map(|(k, _)| k.clone())
            .collect();
        dead.into_iter()
            .filter_map(|k| self.map.remove(&k).map(|(v, _)| (k, v)))
            .collect()
    }

    /// Every flow.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.map.iter_mut().map(|(k, (v, _))| (k, v))
    }

    /// Drop every flow.
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    #[test]
    fn udp_frames_round_trip_through_classify() {
        let f = udp_frame((B, 53), (A, 4000), [1; 6], [2; 6], b"payload").unwrap();
        assert_eq!(
            classify(&f),
            Packet::Udp {
                src: B,
                src_port: 53,
                dst: A,
                dst_port: 4000,
                payload: b"payload"
            }
        );
        // The IPv4 header checksum verifies (sums to 0xffff with the checksum in).
        assert_eq!(checksum_fold(checksum_add(0, &f[14..34])), 0);
        assert!(udp_frame((B, 1), (A, 1), [0; 6], [0; 6], &[0; MAX_UDP_PAYLOAD + 1]).is_none());
    }

    #[test]
    fn tcp_syn_is_recognised_and_other_segments_are_not() {
        let mut f = udp_frame((A, 1234), (B, 80), [1; 6], [2; 6], &[0; 12]).unwrap();
        f[14 + 9] = PROTO_TCP;
        // TCP header in place of UDP's: ports stay, flags at byte 13 of the segment.
        f[34 + 13] = 0x02;
        assert_eq!(
            classify(&f),
            Packet::TcpSyn {
                src_port: 1234,
                dst: B,
                dst_port: 80
            }
        );
        f[34 + 13] = 0x12;
        assert_eq!(classify(&f), Packet::Other);
        // A fragment.
        f[34 + 13] = 0x02;
        f[14 + 6] = 0x20;
        assert_eq!(classify(&f), Packet::Other);
    }

    #[test]
    fn flow_table_evicts_the_least_recently_used_and_expires_idle_flows() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(2, Duration::from_secs(10));
        assert!(t.insert(1, "a", t0).is_none());
        assert!(t.insert(2, "b", t0 + Duration::from_secs(1)).is_none());
        assert_eq!(t.get_mut(&1, t0 + Duration::from_secs(2)), Some(&mut "a"));
        assert_eq!(
            t.insert(3, "c", t0 + Duration::from_secs(3)),
            Some((2, "b"))
        );
        assert_eq!(t.len(), 2);
        let gone = t.expire(t0 + Duration::from_secs(12) + Duration::from_millis(500));
        assert_eq!(gone, vec![(1, "a")]);
        assert_eq!(t.remove(&3), Some("c"));
        assert!(t.is_empty());
    }

    proptest! {
        #[test]
        fn classify_never_panics_and_payloads_lie_inside_the_frame(f in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Packet::Udp { payload, .. } = classify(&f) {
                let start = payload.as_ptr() as usize - f.as_ptr() as usize;
                prop_assert!(start + payload.len() <= f.len());
            }
        }

        #[test]
        fn flow_table_never_exceeds_its_bound(ops in proptest::collection::vec((0u8..20, 0u64..100), 0..200), max in 1usize..8) {
            let t0 = Instant::now();
            let mut t = FlowTable::new(max, Duration::from_secs(30));
            for (k, dt) in ops {
                t.insert(k, (), t0 + Duration::from_secs(dt));
                prop_assert!(t.len() <= max);
            }
        }
    }
}
