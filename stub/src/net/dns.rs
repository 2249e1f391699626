//! The DNS server at 10.0.2.3: queries parsed here (guest-supplied bytes, bounded and
//! checked), names found in the host's `/etc/hosts` answered with their IPv4 addresses,
//! everything else relayed unchanged to the host's first `nameserver` (by the stack).
//!
//! Only standard queries with one question are answered locally; anything else is relayed
//! (or, without a nameserver, refused with `SERVFAIL`).

use std::net::Ipv4Addr;

/// Query type A (IPv4 address).
pub const TYPE_A: u16 = 1;
/// Query class IN.
pub const CLASS_IN: u16 = 1;
/// Longest DNS name (RFC 1035), in presentation form.
pub const MAX_NAME: usize = 253;
/// Largest query accepted (classic UDP DNS).
pub const MAX_QUERY: usize = 512;

/// One parsed standard query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction id.
    pub id: u16,
    /// Recursion desired (copied into the answer).
    pub rd: bool,
    /// The name asked for, lower case, labels joined by dots, no trailing dot.
    pub name: String,
    /// Query type.
    pub qtype: u16,
    /// Query class.
    pub qclass: u16,
    /// The question section as sent (name, type, class), echoed in the answer.
    pub question: Vec<u8>,
}

/// Parse a DNS query: `None` unless it is a standard query (QR = 0, opcode 0) with exactly
/// one question, no answers, and a well-formed uncompressed name of printable labels.
pub fn parse_query(msg: &[u8]) -> Option<Query> {
    if msg.len() < 12 || msg.len() > MAX_QUERY {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qd != 1 || an != 0 {
        return None;
    }
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            // Compression pointers and extended labels do not belong in a question.
            return None;
        }
        let label = msg.get(pos..pos + len)?;
        if !label.iter().all(|b| b.is_ascii_graphic() && *b != b'.') {
            return None;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
        if name.len() > MAX_NAME {
            return None;
        }
        pos += len;
    }
    let tail = msg.get(pos..pos + 4)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    Some(Query {
        id,
        rd: flags & 0x0100 != 0,
        name,
        qtype,
        qclass,
        question: msg[12..pos + 4].to_vec(),
    })
}

/// Response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// No error.
    NoError = 0,
    /// Server failure.
    ServFail = 2,
    /// No such name.
    NxDomain = 3,
}

/// An answer to `q` with `rcode` and, for an `A`/`IN` question, one A record per address
/// (TTL 60 s). At most 16 records are written.
pub fn answer(q: &Query, rcode: Rcode, addrs: &[Ipv4Addr]) -> Vec<u8> {
    let addrs: &[Ipv4Addr] = if q.qtype == TYPE_A && q.qclass == CLASS_IN && rcode == Rcode::NoError
    {
        &addrs[..addrs.len().min(16)]
    } else {
        &[]
    };
    let mut out = Vec::with_capacity(12 + q.question.len() + 16 * addrs.len());
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, AA, RD as asked, RA.
    let flags: u16 = 0x8000 | 0x0400 | if q.rd { 0x0100 } else { 0 } | 0x0080 | rcode as u16;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for a in addrs {
        // A pointer to the question's name at offset 12.
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&60u32.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&a.octets());
    }
    out
}

/// The IPv4 entries of an `/etc/hosts` text: (lower-case name, address), in file order.
pub fn parse_hosts(text: &str) -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<Ipv4Addr>) else {
            continue;
        };
        for name in words {
            out.push((name.trim_end_matches('.').to_ascii_lowercase(), ip));
        }
    }
    out
}

/// The first IPv4 `nameserver` of a `resolv.conf` text.
pub fn first_nameserver(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse().ok())
            .flatten()
    })
}

/// Addresses of `name` in parsed hosts entries.
pub fn lookup_hosts(hosts: &[(String, Ipv4Addr)], name: &str) -> Vec<Ipv4Addr> {
    hosts
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, ip)| *ip)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&0x0100u16.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    #[test]
    fn a_query_is_parsed_and_answered() {
        let q = parse_query(&query(0x1234, "LocalHost", TYPE_A)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "localhost");
        assert!(q.rd);
        let a = answer(&q, Rcode::NoError, &[Ipv4Addr::LOCALHOST]);
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0xf, 0);
        assert_eq!(&a[6..8], &[0, 1]);
        assert_eq!(&a[a.len() - 4..], &[127, 0, 0, 1]);
        assert_eq!(a.len(), 12 + q.question.len() + 16);
        // AAAA: no records.
        let q6 = parse_query(&query(1, "localhost", 28)).unwrap();
        assert_eq!(
            &answer(&q6, Rcode::NoError, &[Ipv4Addr::LOCALHOST])[6..8],
            &[0, 0]
        );
        let nx = answer(&q, Rcode::NxDomain, &[]);
        assert_eq!(nx[3] & 0xf, 3);
    }

    #[test]
    fn malformed_queries_are_refused() {
        let good = query(1, "a.b", TYPE_A);
        assert!(parse_query(&good).is_some());
        assert!(parse_query(&good[..good.len() - 1]).is_none());
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert!(parse_query(&resp).is_none());
        let mut two = good.clone();
        two[5] = 2;
        assert!(parse_query(&two).is_none());
        let mut ptr = good.clone();
        ptr[12] = 0xc0;
        assert!(parse_query(&ptr).is_none());
        assert!(parse_query(&[0; 11]).is_none());
    }

    #[test]
    fn hosts_and_resolv_conf() {
        let h =
            parse_hosts("127.0.0.1 localhost Loop.\n# c\n::1 localhost\n10.1.1.1 a b # x\nbad\n");
        assert_eq!(lookup_hosts(&h, "localhost"), vec![Ipv4Addr::LOCALHOST]);
        assert_eq!(lookup_hosts(&h, "loop"), vec![Ipv4Addr::LOCALHOST]);
        assert_eq!(lookup_hosts(&h, "b"), vec![Ipv4Addr::new(10, 1, 1, 1)]);
        assert!(lookup_hosts(&h, "x").is_empty());
        assert_eq!(
            first_nameserver("# x\nsearch a\nnameserver fe80::1\nnameserver 10.9.9.9\n"),
            Some(Ipv4Addr::new(10, 9, 9, 9))
        );
        assert_eq!(first_nameserver(""), None);
    }

    proptest! {
        #[test]
        fn parse_query_never_panics_and_answers_stay_bounded(msg in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some(q) = parse_query(&msg) {
                prop_assert!(q.name.len() <= MAX_NAME);
                let a = answer(&q, Rcode::NoError, &[Ipv4Addr::LOCALHOST; 40]);
                prop_assert!(a.len() <= 12 + q.question.len() + 16 * 16);
            }
        }

        #[test]
        fn well_formed_names_round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..6), id: u16) {
            let name = labels.join(".");
            let q = parse_query(&query(id, &name, TYPE_A)).unwrap();
            prop_assert_eq!(q.name, name);
            prop_assert_eq!(q.id, id);
        }
    }
}
