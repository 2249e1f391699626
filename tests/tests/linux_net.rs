//! The user-mode network (`smolvm run --net`) on a real Linux guest: `examples/hello` built
//! once, then servers this test starts on 127.0.0.1 reached from the guest through the
//! gateway 10.0.2.2 (HTTP with exact bytes, a UDP exchange), DNS of `localhost` from the
//! host's /etc/hosts at 10.0.2.3, `--net-allow` refusing another port, and no network at
//! all without `--net`, also after a machine was saved with it. All traffic stays on this
//! machine's loopback. A packed executable takes `SMOLVM_NET=1`. A second, minimal machine
//! built with a Smolfile `[network]` (allowing one test server's port) has the network
//! without `--net`, refuses another port, and has none with `--net=off`.
//!
//! Needs /dev/kvm and the guest artifacts (`scripts/setup`); skips loudly without them,
//! except under `CI=true`, where it fails. Every run has a deadline (`timeout`).

mod build_util;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use build_util::{bin, describe, guest, repo, smolpack_build};

/// Serialises the machines of this file (the PVM host runs one at a time well).
static ONE_MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `examples/hello`, built once (or `SMOLVM_TEST_NET_MACHINE`, built beforehand).
fn hello(test: &str) -> Option<&'static PathBuf> {
    static BUILT: OnceLock<Result<(tempfile::TempDir, PathBuf), String>> = OnceLock::new();
    let guest = guest(test)?;
    let built = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        if let Ok(m) = std::env::var("SMOLVM_TEST_NET_MACHINE") {
            return Ok((dir, PathBuf::from(m)));
        }
        let machine = dir.path().join("hello.smolmachine");
        let out = smolpack_build(&guest, &repo().join("examples/hello/Smolfile"), &machine);
        if !out.status.success() {
            return Err(format!("smolpack build failed: {}", describe(&out)));
        }
        Ok((dir, machine))
    });
    match built {
        Ok((_, m)) => Some(m),
        Err(e) => panic!("{e}"),
    }
}

/// `smolvm run ARGS MACHINE -- sh -c SCRIPT` under a deadline.
fn run(args: &[&str], machine: &Path, script: &str) -> Output {
    let _one = ONE_MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    Command::new("timeout")
        .arg("600")
        .arg(bin("smolvm", "smolvm"))
        .arg("run")
        .args(args)
        .arg(machine)
        .args(["--", "sh", "-c", script])
        .output()
        .expect("running smolvm")
}

/// An HTTP server on 127.0.0.1 answering every request with `body`; counts connections.
fn http_server(body: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(body);
        }
    });
    (port, hits)
}

/// A UDP "DNS server" on 127.0.0.1 answering every query with one A record 192.0.2.77.
fn udp_dns_server() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut b = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            if n < 12 {
                continue;
            }
            let mut r = b[..n].to_vec();
            let qtype = u16::from_be_bytes([r[n - 4], r[n - 3]]);
            r[2] = 0x81;
            r[3] = 0x80;
            if qtype == 1 {
                r[7] = 1;
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 77]);
            }
            let _ = s.send_to(&r, from);
        }
    });
    port
}

const BODY: &[u8] = b"net test body: exact bytes\n0123456789abcdef\n";

#[test]
fn guest_reaches_host_servers_through_the_gateway() {
    let Some(m) = hello("guest_reaches_host_servers_through_the_gateway") else {
        return;
    };
    let (http, hits) = http_server(BODY);
    let udp = udp_dns_server();
    let script = format!(
        "wget -qO- http://10.0.2.2:{http}/ > /tmp/body && cat /tmp/body && echo WGET-OK; \
         nslookup test.example 10.0.2.2:{udp} | grep -q 192.0.2.77 && echo UDP-OK; \
         nslookup localhost 10.0.2.3 | grep -q 127.0.0.1 && echo DNS-OK; \
         cat /etc/resolv.conf"
    );
    let out = run(&["--net"], m, &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    let expected = format!("{}WGET-OK\n", String::from_utf8_lossy(BODY));
    assert!(stdout.starts_with(&expected), "{}", describe(&out));
    assert!(stdout.contains("UDP-OK\n"), "{}", describe(&out));
    assert!(stdout.contains("DNS-OK\n"), "{}", describe(&out));
    assert!(stdout.contains("nameserver 10.0.2.3"), "{}", describe(&out));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[test]
fn net_allow_refuses_other_destinations() {
    let Some(m) = hello("net_allow_refuses_other_destinations") else {
        return;
    };
    let (allowed, allowed_hits) = http_server(BODY);
    let (other, other_hits) = http_server(b"must not be reached");
    let script = format!(
        "wget -qO- http://10.0.2.2:{allowed}/ && echo ALLOWED-OK; \
         wget -qO- http://10.0.2.2:{other}/; echo other=$?"
    );
    let rule = format!("127.0.0.1:{allowed}");
    let out = run(&["--net-allow", &rule], m, &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.contains("ALLOWED-OK"), "{}", describe(&out));
    assert!(stdout.contains("other=1"), "{}", describe(&out));
    assert!(
        !stdout.contains("must not be reached"),
        "{}",
        describe(&out)
    );
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);
}

#[test]
fn no_network_without_net_even_after_a_save_with_it() {
    let Some(m) = hello("no_network_without_net_even_after_a_save_with_it") else {
        return;
    };
    let (port, hits) = http_server(BODY);
    let probe = format!(
        "ls /sys/class/net | tr '\\n' ' '; echo; wget -qO- -T 5 http://10.0.2.2:{port}/; \
         echo wget=$?"
    );
    let out = run(&[], m, &probe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.starts_with("lo \n"), "{}", describe(&out));
    assert!(stdout.contains("wget=1"), "{}", describe(&out));
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    // Saved with the network up: the saved machine has no card again.
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved.smolmachine");
    let saved_arg = saved.to_string_lossy().into_owned();
    let out = run(
        &["--net", "--save", &saved_arg],
        m,
        &format!("wget -qO- http://10.0.2.2:{port}/ > /dev/null && echo UP"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "UP\n");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let out = run(&[], &saved, &probe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.starts_with("lo \n"), "{}", describe(&out));
    assert!(stdout.contains("wget=1"), "{}", describe(&out));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // And it can have the network again.
    let out = run(
        &["--net"],
        &saved,
        &format!("wget -qO- http://10.0.2.2:{port}/"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(out.stdout, BODY);
}

#[test]
fn packed_executable_takes_smolvm_net() {
    let Some(m) = hello("packed_executable_takes_smolvm_net") else {
        return;
    };
    let (port, hits) = http_server(BODY);
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hello");
    let out = Command::new(bin("smolpack", "smolpack"))
        .arg("pack")
        .arg(m)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running smolpack pack");
    assert!(out.status.success(), "{}", describe(&out));
    let _one = ONE_MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let url = format!("http://10.0.2.2:{port}/");
    let out = Command::new("timeout")
        .arg("600")
        .arg(&exe)
        .args(["wget", "-qO-", &url])
        .env("SMOLVM_NET", "1")
        .output()
        .expect("running the packed executable");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(out.stdout, BODY);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let out = Command::new(&exe)
        .arg("true")
        .env("SMOLVM_NET", "yes")
        .output()
        .expect("running the packed executable");
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "smolvm: bad SMOLVM_NET 'yes': expected 1 or 0\n"
    );
}

/// A minimal busybox machine whose Smolfile has `[network] allow = ["127.0.0.1:PORT"]`,
/// PORT that of an HTTP server (answering `BODY`) that lives as long as the test process;
/// built once. Returns the machine, the port and the server's connection count.
fn network_machine(test: &str) -> Option<&'static (PathBuf, u16, Arc<AtomicUsize>)> {
    type Built = (tempfile::TempDir, (PathBuf, u16, Arc<AtomicUsize>));
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    let guest = guest(test)?;
    let built = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (port, hits) = http_server(BODY);
        let smolfile = dir.path().join("Smolfile");
        std::fs::write(
            &smolfile,
            format!(
                "name = \"netcfg\"\n[base]\ntype = \"busybox\"\n[resources]\nmemory = \"128M\"\n\
                 [network]\nallow = [\"127.0.0.1:{port}\"]\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let machine = dir.path().join("netcfg.smolmachine");
        let out = smolpack_build(&guest, &smolfile, &machine);
        if !out.status.success() {
            return Err(format!("smolpack build failed: {}", describe(&out)));
        }
        Ok((dir, (machine, port, hits)))
    });
    match built {
        Ok((_, b)) => Some(b),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn smolfile_network_is_on_by_default_and_net_off_turns_it_off() {
    let Some((m, allowed, hits)) =
        network_machine("smolfile_network_is_on_by_default_and_net_off_turns_it_off")
    else {
        return;
    };
    let (other, other_hits) = http_server(b"must not be reached");
    // No --net: the Smolfile's [network] gives the card, limited to its allow list.
    let script = format!(
        "wget -qO- http://10.0.2.2:{allowed}/ && echo ALLOWED-OK; \
         wget -qO- http://10.0.2.2:{other}/; echo other=$?"
    );
    let out = run(&[], m, &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    let expected = format!("{}ALLOWED-OK\nother=1\n", String::from_utf8_lossy(BODY));
    assert_eq!(stdout, expected, "{}", describe(&out));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);

    // --net=off: no card at all.
    let probe = format!(
        "ls /sys/class/net | tr '\\n' ' '; echo; wget -qO- http://10.0.2.2:{allowed}/; \
         echo wget=$?"
    );
    let out = run(&["--net=off"], m, &probe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout, "lo \nwget=1\n", "{}", describe(&out));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
