//! The user-mode network behind `--net` (`SMOLVM_NET=1`, a Smolfile's `[network]`).
//!
//! The guest gets a virtio-net card (`devices::virtio::net`) on a fixed, private subnet:
//!
//! | what | value |
//! |---|---|
//! | guest address | 10.0.2.15/24, MAC 52:54:00:12:34:56 |
//! | gateway | 10.0.2.2 (host loopback: a guest connection to 10.0.2.2:P reaches 127.0.0.1:P) |
//! | DNS server | 10.0.2.3 (answers from the host's `/etc/hosts`, else relays to the host's first `nameserver`) |
//!
//! Nothing on the host is configured and nothing needs root: the VMM terminates the guest's
//! TCP connections in a TCP/IP stack of its own (`smoltcp`) and opens a host socket for
//! each, as the invoking user; UDP datagrams are relayed per flow through connected host
//! UDP sockets. `--net-allow` limits the destinations ([`AllowList`]); everything else is
//! refused (TCP: reset, as "connection refused"; UDP: dropped). See docs/ARCHITECTURE.md,
//! "Network", for the design and its limits.

pub mod dns;
pub mod flows;
pub mod stack;

use std::net::Ipv4Addr;

/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest's subnet.
pub const PREFIX_LEN: u8 = 24;
/// The gateway: the VMM's side of the link, and host loopback for connections to it.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server the guest is given.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest card's MAC address (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The VMM side's MAC address (what the guest's ARP finds for the gateway and DNS).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// Where a guest packet's destination goes on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A host address (the gateway maps to 127.0.0.1).
    Host(Ipv4Addr),
    /// The DNS server (UDP port 53 only).
    Dns,
    /// Nothing: another address on the guest's own subnet, or a non-unicast one.
    Nowhere,
}

/// Map the destination address of a guest packet to where it goes.
pub fn destination(dst: Ipv4Addr) -> Destination {
    if dst == GATEWAY_IP {
        Destination::Host(Ipv4Addr::LOCALHOST)
    } else if dst == DNS_IP {
        Destination::Dns
    } else if in_subnet(dst)
        || dst.is_broadcast()
        || dst.is_multicast()
        || dst.is_unspecified()
        || dst.octets()[0] == 0
    {
        Destination::Nowhere
    } else {
        Destination::Host(dst)
    }
}

fn in_subnet(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> (32 - PREFIX_LEN) == u32::from(GUEST_IP) >> (32 - PREFIX_LEN)
}

/// One `--net-allow` entry: an IPv4 network (a host is a /32) and optionally one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    /// Network address (host bits cleared).
    pub net: Ipv4Addr,
    /// Prefix length, 0-32.
    pub prefix: u8,
    /// The one port allowed, or every port.
    pub port: Option<u16>,
}

impl AllowRule {
    /// Whether host address `ip`, port `port` is inside this rule.
    pub fn matches(&self, ip: Ipv4Addr, port: u16) -> bool {
        let mask = mask(self.prefix);
        u32::from(ip) & mask == u32::from(self.net) && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for AllowRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// The destinations a machine may reach: every one when empty (`--net` alone), else only
/// those some rule matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<AllowRule>);

impl AllowList {
    /// Whether the guest may reach host address `ip`, port `port`.
    pub fn allows(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.0.is_empty() || self.0.iter().any(|r| r.matches(ip, port))
    }
}

fn port_number(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

/// Parse one `--net-allow` value: `HOST|CIDR[:PORT]`, HOST an IPv4 address or `localhost`
/// (127.0.0.1; no other names are resolved: the list is fixed before the machine runs and
/// a name's addresses change), CIDR `A.B.C.D/N`. Errors are one line naming the value.
pub fn parse_allow(spec: &str) -> Result<AllowRule, String> {
    let bad = |why: &str| {
        format!(
            "bad --net-allow '{spec}': {why} (expected HOST|CIDR[:PORT], HOST an IPv4 address \
             or localhost)"
        )
    };
    let (addr, port) = match spec.rsplit_once(':') {
        Some((a, p)) => (
            a,
            Some(port_number(p).ok_or_else(|| bad("the port must be 1-65535"))?),
        ),
        None => (spec, None),
    };
    let (host, prefix) = match addr.split_once('/') {
        Some((h, n)) => {
            let n = if !n.is_empty() && n.len() <= 2 && n.bytes().all(|b| b.is_ascii_digit()) {
                n.parse::<u8>().ok().filter(|&n| n <= 32)
            } else {
                None
            };
            (h, n.ok_or_else(|| bad("the prefix length must be 0-32"))?)
        }
        None => (addr, 32),
    };
    if host.is_empty() {
        return Err(bad("no address"));
    }
    let ip = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST
    } else if host.contains(':') || host.starts_with('[') {
        return Err(bad("IPv6 is not supported"));
    } else {
        host.parse::<Ipv4Addr>()
            .map_err(|_| bad(&format!("'{host}' is not an IPv4 address")))?
    };
    Ok(AllowRule {
        net: Ipv4Addr::from(u32::from(ip) & mask(prefix)),
        prefix,
        port,
    })
}

/// Parse a comma-separated list of `--net-allow` values (`SMOLVM_NET_ALLOW`).
pub fn parse_allow_list(list: &str) -> Result<Vec<AllowRule>, String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(parse_allow)
        .collect()
}

/// Network settings of one run.
#[derive(Debug, Clone, Default)]
pub struct NetOptions {
    /// Where the guest may connect.
    pub allow: AllowList,
}

/// What the caller of one run asked of the network (`--net`, `--net=off`, `--net-allow`,
/// `SMOLVM_NET`, `SMOLVM_NET_ALLOW`), before the machine's own `[network]` default is
/// applied by [`NetRequest::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetRequest {
    /// Nothing said: the machine's default (off unless its Smolfile has `[network]`).
    #[default]
    Default,
    /// `--net=off`, `SMOLVM_NET=0`: no network, whatever the machine's default.
    Off,
    /// `--net`, `SMOLVM_NET=1`: the network, limited by the machine's `[network] allow`
    /// when it has one, else to every destination.
    On,
    /// `--net-allow`, `SMOLVM_NET_ALLOW`: the network, limited to exactly these rules (they
    /// replace the machine's `allow`).
    Allow(Vec<AllowRule>),
}

impl NetRequest {
    /// Combine the flags of one command line or environment: `on` (`--net`), `off`
    /// (`--net=off`) and the `--net-allow` rules. `off` with `on` or with rules is a
    /// contradiction (an error naming `what`, the spelling the caller used).
    pub fn from_flags(
        on: bool,
        off: bool,
        rules: Vec<AllowRule>,
        what: &str,
    ) -> Result<NetRequest, String> {
        match (on, off, rules.is_empty()) {
            (true, true, _) | (_, true, false) => Err(format!(
                "{what}: the network cannot be both off and on (drop the off, or the other \
                 network options)"
            )),
            (false, true, true) => Ok(NetRequest::Off),
            (_, false, false) => Ok(NetRequest::Allow(rules)),
            (true, false, true) => Ok(NetRequest::On),
            (false, false, true) => Ok(NetRequest::Default),
        }
    }

    /// The network of the run: this request applied to the machine's default, `machine`
    /// (`None`: the machine has no `[network]`; `Some(list)`: it has one with that `allow`
    /// list, empty for every destination).
    pub fn resolve(&self, machine: Option<&AllowList>) -> Option<NetOptions> {
        match self {
            NetRequest::Off => None,
            NetRequest::Default => machine.map(|a| NetOptions { allow: a.clone() }),
            NetRequest::On => Some(NetOptions {
                allow: machine.cloned().unwrap_or_default(),
            }),
            NetRequest::Allow(rules) => Some(NetOptions {
                allow: AllowList(rules.clone()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allow_specs_parse() {
        let r = parse_allow("127.0.0.1:8080").unwrap();
        assert_eq!(
            r,
            AllowRule {
                net: Ipv4Addr::LOCALHOST,
                prefix: 32,
                port: Some(8080)
            }
        );
        assert!(r.matches(Ipv4Addr::LOCALHOST, 8080));
        assert!(!r.matches(Ipv4Addr::LOCALHOST, 8081));
        let r = parse_allow("10.1.2.3/8").unwrap();
        assert_eq!(r.net, Ipv4Addr::new(10, 0, 0, 0));
        assert!(r.matches(Ipv4Addr::new(10, 9, 9, 9), 1));
        assert!(!r.matches(Ipv4Addr::new(11, 0, 0, 0), 1));
        assert_eq!(parse_allow("localhost").unwrap().net, Ipv4Addr::LOCALHOST);
        assert!(parse_allow("0.0.0.0/0:53")
            .unwrap()
            .matches(Ipv4Addr::new(8, 8, 8, 8), 53));
        assert_eq!(
            parse_allow("1.2.3.4/24:443").unwrap().to_string(),
            "1.2.3.0/24:443"
        );
    }

    #[test]
    fn bad_allow_specs_are_one_line_each() {
        for (spec, why) in [
            ("", "no address"),
            (":80", "no address"),
            ("1.2.3.4:0", "the port must be 1-65535"),
            ("1.2.3.4:65536", "the port must be 1-65535"),
            ("1.2.3.4:", "the port must be 1-65535"),
            ("1.2.3.4/33", "the prefix length must be 0-32"),
            ("1.2.3.4/", "the prefix length must be 0-32"),
            ("example.com", "'example.com' is not an IPv4 address"),
            ("[::1]:80", "IPv6 is not supported"),
        ] {
            let e = parse_allow(spec).unwrap_err();
            assert_eq!(
                e,
                format!(
                    "bad --net-allow '{spec}': {why} (expected HOST|CIDR[:PORT], HOST an IPv4 \
                     address or localhost)"
                )
            );
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn requests_apply_to_the_machine_default() {
        let rule = parse_allow("127.0.0.1:80").unwrap();
        let other = parse_allow("10.0.0.0/8").unwrap();
        let machine = AllowList(vec![rule]);
        let allow = |n: Option<NetOptions>| n.map(|n| n.allow);
        // No [network]: off unless asked.
        assert_eq!(allow(NetRequest::Default.resolve(None)), None);
        assert_eq!(allow(NetRequest::Off.resolve(None)), None);
        assert_eq!(
            allow(NetRequest::On.resolve(None)),
            Some(AllowList::default())
        );
        // [network] with an allow list: on by default, --net keeps the list, --net-allow
        // replaces it, --net=off turns it off.
        assert_eq!(
            allow(NetRequest::Default.resolve(Some(&machine))),
            Some(machine.clone())
        );
        assert_eq!(
            allow(NetRequest::On.resolve(Some(&machine))),
            Some(machine.clone())
        );
        assert_eq!(
            allow(NetRequest::Allow(vec![other]).resolve(Some(&machine))),
            Some(AllowList(vec![other]))
        );
        assert_eq!(allow(NetRequest::Off.resolve(Some(&machine))), None);
    }

    #[test]
    fn request_flags_combine() {
        let rule = parse_allow("127.0.0.1:80").unwrap();
        let f = NetRequest::from_flags;
        assert_eq!(f(false, false, vec![], "x"), Ok(NetRequest::Default));
        assert_eq!(f(true, false, vec![], "x"), Ok(NetRequest::On));
        assert_eq!(f(false, true, vec![], "x"), Ok(NetRequest::Off));
        assert_eq!(
            f(true, false, vec![rule], "x"),
            Ok(NetRequest::Allow(vec![rule]))
        );
        assert_eq!(
            f(false, false, vec![rule], "x"),
            Ok(NetRequest::Allow(vec![rule]))
        );
        for (on, rules) in [(true, vec![]), (false, vec![rule]), (true, vec![rule])] {
            let e = f(on, true, rules, "--net=off").unwrap_err();
            assert!(e.starts_with("--net=off: ") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn empty_list_allows_everything() {
        assert!(AllowList::default().allows(Ipv4Addr::new(1, 2, 3, 4), 9));
        let l = AllowList(parse_allow_list("127.0.0.1:80,10.0.0.0/8").unwrap());
        assert!(l.allows(Ipv4Addr::LOCALHOST, 80));
        assert!(!l.allows(Ipv4Addr::LOCALHOST, 81));
        assert!(l.allows(Ipv4Addr::new(10, 3, 3, 3), 81));
    }

    #[test]
    fn destinations_map_the_gateway_to_loopback() {
        assert_eq!(
            destination(GATEWAY_IP),
            Destination::Host(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(destination(DNS_IP), Destination::Dns);
        assert_eq!(
            destination(Ipv4Addr::new(10, 0, 2, 9)),
            Destination::Nowhere
        );
        assert_eq!(destination(Ipv4Addr::BROADCAST), Destination::Nowhere);
        assert_eq!(
            destination(Ipv4Addr::new(224, 0, 0, 1)),
            Destination::Nowhere
        );
        let ip = Ipv4Addr::new(93, 184, 216, 34);
        assert_eq!(destination(ip), Destination::Host(ip));
    }

    proptest! {
        #[test]
        fn parse_allow_never_panics(s in ".{0,40}") {
            let _ = parse_allow(&s);
        }

        #[test]
        fn parsed_rules_match_their_own_network(a: u32, prefix in 0u8..=32, port in proptest::option::of(1u16..)) {
            let ip = Ipv4Addr::from(a);
            let spec = match port {
                Some(p) => format!("{ip}/{prefix}:{p}"),
                None => format!("{ip}/{prefix}"),
            };
            let r = parse_allow(&spec).unwrap();
            prop_assert!(r.matches(ip, port.unwrap_or(1)));
            prop_assert_eq!(parse_allow(&r.to_string()).unwrap(), r);
        }
    }
}
