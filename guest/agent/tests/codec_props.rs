//! Property tests of the frame codec: every message survives a round trip however the
//! stream is split, and arbitrary bytes never panic the decoder or make it allocate beyond
//! one maximal frame. Then the client's enforcement: whatever the agent sends, the client
//! holds at most one credit window per stream and the answers it asked for, and an agent
//! that respects its credit is never flagged.

use proptest::prelude::*;
use smolvm_agent::client::{ProtocolViolations, Replay, MAX_STRAY_FRAMES, PROTOCOL_BROKEN};
use smolvm_agent::protocol::{
    encode_frame, read_frame, AgentMsg, Applied, ExecRequest, ExitStatus, FrameDecoder, HostMsg,
    ProtocolError, QuiesceReport, ResumeReport, Stream, User, WallClock, WarmMode, WarmRequest,
    WarmState, WinSize, HEADER_LEN, INITIAL_WINDOW, MAX_CHUNK, MAX_PAYLOAD,
};

fn stream() -> impl Strategy<Value = Stream> {
    prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)]
}

fn winsize() -> impl Strategy<Value = WinSize> {
    (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| WinSize { rows, cols })
}

fn exec_request() -> impl Strategy<Value = ExecRequest> {
    (
        prop::collection::vec(".{0,12}", 0..5),
        prop::collection::vec((".{0,8}", ".{0,8}"), 0..4),
        prop::option::of(".{0,16}"),
        prop::option::of(prop_oneof![
            (any::<u32>(), prop::option::of(any::<u32>()))
                .prop_map(|(uid, gid)| User::Id { uid, gid }),
            ".{0,10}".prop_map(User::Name),
        ]),
        prop::option::of(winsize()),
    )
        .prop_map(|(argv, env, cwd, user, tty)| ExecRequest {
            argv,
            env,
            cwd,
            user,
            tty,
        })
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

fn applied() -> impl Strategy<Value = Applied> {
    prop_oneof![
        Just(Applied::Applied),
        Just(Applied::Skipped),
        ".{0,20}".prop_map(Applied::Failed)
    ]
}

fn host_msg() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        any::<u32>().prop_map(|version| HostMsg::Hello { version }),
        any::<u32>().prop_map(|req| HostMsg::Ping { req }),
        (any::<u32>(), exec_request()).prop_map(|(id, req)| HostMsg::Exec { id, req }),
        (any::<u32>(), bytes()).prop_map(|(id, data)| HostMsg::Stdin { id, data }),
        any::<u32>().prop_map(|id| HostMsg::StdinEof { id }),
        (any::<u32>(), winsize()).prop_map(|(id, size)| HostMsg::Resize { id, size }),
        (any::<u32>(), any::<i32>()).prop_map(|(id, signal)| HostMsg::Signal { id, signal }),
        (any::<u32>(), stream(), any::<u32>()).prop_map(|(id, stream, bytes)| HostMsg::Credit {
            id,
            stream,
            bytes
        }),
        any::<u32>().prop_map(|req| HostMsg::Quiesce { req }),
        any::<u32>().prop_map(|req| HostMsg::Unquiesce { req }),
        (any::<u32>(), any::<i64>(), any::<u32>(), bytes()).prop_map(
            |(req, secs, nanos, entropy)| HostMsg::Resume {
                req,
                now: WallClock { secs, nanos },
                entropy
            }
        ),
        (any::<u32>(), any::<bool>()).prop_map(|(req, reboot)| HostMsg::Shutdown { req, reboot }),
        (any::<u32>(), exec_request(), any::<bool>(), any::<u32>()).prop_map(
            |(req, exec, invoke, prefix)| HostMsg::Warm {
                req,
                warm: WarmRequest {
                    exec,
                    mode: if invoke {
                        WarmMode::Invoke
                    } else {
                        WarmMode::Stdin
                    },
                    prefix,
                },
            }
        ),
    ]
}

fn agent_msg() -> impl Strategy<Value = AgentMsg> {
    let status = prop_oneof![
        any::<i32>().prop_map(ExitStatus::Code),
        any::<i32>().prop_map(ExitStatus::Signal)
    ];
    prop_oneof![
        any::<u32>().prop_map(|version| AgentMsg::Ready { version }),
        any::<u32>().prop_map(|req| AgentMsg::Pong { req }),
        (any::<u32>(), any::<u32>()).prop_map(|(id, pid)| AgentMsg::Started { id, pid }),
        (any::<u32>(), ".{0,30}").prop_map(|(id, error)| AgentMsg::ExecFailed { id, error }),
        (any::<u32>(), stream(), bytes()).prop_map(|(id, stream, data)| AgentMsg::Output {
            id,
            stream,
            data
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(id, bytes)| AgentMsg::StdinCredit { id, bytes }),
        (any::<u32>(), status).prop_map(|(id, status)| AgentMsg::Exited { id, status }),
        (any::<u32>(), applied(), applied(), any::<u32>()).prop_map(
            |(req, sync, drop_caches, running_execs)| AgentMsg::Quiesced {
                req,
                report: QuiesceReport {
                    sync,
                    drop_caches,
                    running_execs
                }
            }
        ),
        any::<u32>().prop_map(|req| AgentMsg::Unquiesced { req }),
        (any::<u32>(), any::<u32>()).prop_map(|(req, pid)| AgentMsg::WarmReady {
            req,
            state: WarmState::Ready { pid }
        }),
        (any::<u32>(), ".{0,30}").prop_map(|(req, why)| AgentMsg::WarmReady {
            req,
            state: WarmState::Failed(why)
        }),
        (any::<u32>(), applied(), applied(), any::<u32>()).prop_map(
            |(req, clock, entropy, dropped_execs)| AgentMsg::Resumed {
                req,
                report: ResumeReport {
                    clock,
                    entropy,
                    dropped_execs
                }
            }
        ),
        any::<u32>().prop_map(|req| AgentMsg::ShuttingDown { req }),
        ".{0,40}".prop_map(|message| AgentMsg::Error { message }),
    ]
}

/// Feeds `bytes` to a decoder in pieces cut at `cuts`, collecting messages.
fn decode_in_pieces<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Vec<T>, ProtocolError> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for w in points.windows(2) {
        dec.feed(&bytes[w[0]..w[1]]);
        while let Some(m) = dec.next_msg::<T>()? {
            out.push(m);
        }
        // Never more buffered than one maximal frame plus what was just fed.
        assert!(dec.pending() <= HEADER_LEN + MAX_PAYLOAD + (w[1] - w[0]));
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn host_messages_round_trip(msgs in prop::collection::vec(host_msg(), 1..6),
                                cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let mut bytes = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut bytes).unwrap();
        }
        prop_assert_eq!(&decode_in_pieces::<HostMsg>(&bytes, &cuts).unwrap(), &msgs);
        let mut r = &bytes[..];
        for m in &msgs {
            prop_assert_eq!(&read_frame::<_, HostMsg>(&mut r).unwrap(), m);
        }
        prop_assert!(matches!(read_frame::<_, HostMsg>(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn agent_messages_round_trip(msgs in prop::collection::vec(agent_msg(), 1..6),
                                 cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let mut bytes = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut bytes).unwrap();
        }
        prop_assert_eq!(&decode_in_pieces::<AgentMsg>(&bytes, &cuts).unwrap(), &msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096),
                                   cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let _ = decode_in_pieces::<HostMsg>(&data, &cuts);
        let _ = decode_in_pieces::<AgentMsg>(&data, &cuts);
        let _ = read_frame::<_, HostMsg>(&mut &data[..]);
        let _ = read_frame::<_, AgentMsg>(&mut &data[..]);
    }

    #[test]
    fn framed_garbage_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        // A valid header around random payload exercises the message decoder itself.
        let mut data = b"SM".to_vec();
        data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        data.extend_from_slice(&payload);
        let mut dec = FrameDecoder::new();
        dec.feed(&data);
        let _ = dec.next_msg::<HostMsg>();
        let mut dec = FrameDecoder::new();
        dec.feed(&data);
        let _ = dec.next_msg::<AgentMsg>();
    }

    #[test]
    fn headers_over_the_limit_are_rejected_before_any_payload(len in (MAX_PAYLOAD as u32 + 1)..=u32::MAX) {
        let mut data = b"SM".to_vec();
        data.extend_from_slice(&len.to_le_bytes());
        let mut dec = FrameDecoder::new();
        dec.feed(&data);
        prop_assert!(matches!(dec.next_msg::<HostMsg>(), Err(ProtocolError::TooLarge(_))));
        prop_assert!(matches!(read_frame::<_, HostMsg>(&mut &data[..]), Err(ProtocolError::TooLarge(_))));
    }
}

#[test]
fn a_huge_length_prefix_inside_a_payload_allocates_nothing_big() {
    // Stdin { id: 1, data: <claims 2^32-1 bytes> } in a small frame: must be an error, not
    // a 4 GiB allocation.
    let payload = [3u8, 1, 0xff, 0xff, 0xff, 0xff, 0x0f];
    let mut data = b"SM".to_vec();
    data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    data.extend_from_slice(&payload);
    let mut dec = FrameDecoder::new();
    dec.feed(&data);
    assert!(dec.next_msg::<HostMsg>().is_err());
}

// The client's enforcement, through `client::Replay` (the same state and rules as a `Client`).

/// Folds ids and request numbers into a small range so that frames hit the live execs
/// (1..=3) and the outstanding requests (1, 2) as often as they miss.
fn narrow(msg: AgentMsg) -> AgentMsg {
    let id = |i: u32| i % 5;
    let req = |r: u32| r % 4;
    match msg {
        AgentMsg::Pong { req: r } => AgentMsg::Pong { req: req(r) },
        AgentMsg::Started { id: i, pid } => AgentMsg::Started { id: id(i), pid },
        AgentMsg::ExecFailed { id: i, error } => AgentMsg::ExecFailed { id: id(i), error },
        AgentMsg::Output {
            id: i,
            stream,
            data,
        } => AgentMsg::Output {
            id: id(i),
            stream,
            data,
        },
        AgentMsg::StdinCredit { id: i, bytes } => AgentMsg::StdinCredit {
            id: id(i),
            bytes: bytes % (2 * INITIAL_WINDOW),
        },
        AgentMsg::Exited { id: i, status } => AgentMsg::Exited { id: id(i), status },
        AgentMsg::Quiesced { req: r, report } => AgentMsg::Quiesced {
            req: req(r),
            report,
        },
        AgentMsg::Unquiesced { req: r } => AgentMsg::Unquiesced { req: req(r) },
        AgentMsg::Resumed { req: r, report } => AgentMsg::Resumed {
            req: req(r),
            report,
        },
        AgentMsg::ShuttingDown { req: r } => AgentMsg::ShuttingDown { req: req(r) },
        other => other,
    }
}

/// One step of a hostile (or not) agent against the client.
#[derive(Debug, Clone)]
enum Step {
    Frame(AgentMsg),
    /// The reader of exec 1's stdout takes up to this many bytes.
    Read(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => agent_msg().prop_map(|m| Step::Frame(narrow(m))),
        1 => (1usize..100_000).prop_map(Step::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn whatever_the_agent_sends_the_client_stays_within_its_windows(
        steps in prop::collection::vec(step(), 1..40)
    ) {
        let mut client = Replay::new(&[1, 2, 3], &[3], &[1, 2]);
        let mut was_open = true;
        for s in steps {
            let open = match s {
                Step::Frame(m) => client.apply(m),
                Step::Read(n) => {
                    client.read(1, Stream::Stdout, n);
                    client.closed().is_none()
                }
            };
            // Once over, the session stays over.
            prop_assert!(was_open || !open);
            was_open = open;
            prop_assert_eq!(client.check(), Ok(()));
            let b = client.buffered();
            prop_assert!(b.max_stream_bytes <= INITIAL_WINDOW as usize);
            prop_assert!(b.replies <= 2);
            let v = client.violations();
            prop_assert!(v.stray() <= MAX_STRAY_FRAMES + 1);
            if v.beyond_window > 0 || v.stray() > MAX_STRAY_FRAMES {
                prop_assert!(client.closed().unwrap().starts_with(PROTOCOL_BROKEN));
            }
        }
    }

    #[test]
    fn an_agent_that_respects_credit_is_never_flagged(
        ops in prop::collection::vec((1usize..3 * MAX_CHUNK, 1usize..200_000), 1..60)
    ) {
        // The agent sends up to its remaining credit on exec 1's stdout, the host reads at
        // its own pace and credits back; the agent learns of credit only from the client.
        let mut client = Replay::new(&[1], &[], &[]);
        let mut agent_window = INITIAL_WINDOW as usize;
        let (mut sent, mut read) = (0usize, 0usize);
        for (want, take) in ops {
            let n = want.min(agent_window).min(MAX_CHUNK);
            if n > 0 {
                let open = client.apply(AgentMsg::Output {
                    id: 1,
                    stream: Stream::Stdout,
                    data: vec![7; n],
                });
                prop_assert!(open);
                agent_window -= n;
                sent += n;
            }
            let (got, credit) = client.read(1, Stream::Stdout, take);
            read += got;
            agent_window += credit as usize;
            prop_assert!(client.buffered().max_stream_bytes <= INITIAL_WINDOW as usize);
        }
        prop_assert_eq!(client.violations(), ProtocolViolations::default());
        prop_assert_eq!(client.buffered().stream_bytes, sent - read);
        let open = client.apply(AgentMsg::Exited { id: 1, status: ExitStatus::Code(0) });
        prop_assert!(open);
    }

    #[test]
    fn output_one_byte_past_the_credit_ends_the_session(
        first in 0usize..=INITIAL_WINDOW as usize,
        stream in stream(),
        discard in any::<bool>(),
    ) {
        let discard_ids: &[u32] = if discard { &[1] } else { &[] };
        let mut client = Replay::new(&[1], discard_ids, &[]);
        let open = client.apply(AgentMsg::Output { id: 1, stream, data: vec![0; first] });
        prop_assert!(open);
        // A stream nobody reads is credited back at once: its window is full again.
        let left = if discard { INITIAL_WINDOW as usize } else { INITIAL_WINDOW as usize - first };
        let open = client.apply(AgentMsg::Output { id: 1, stream, data: vec![0; left + 1] });
        prop_assert!(!open);
        prop_assert_eq!(client.violations().beyond_window, 1);
        prop_assert!(client.closed().unwrap().starts_with(PROTOCOL_BROKEN));
        prop_assert_eq!(client.check(), Ok(()));
    }

    #[test]
    fn arbitrary_bytes_as_an_agent_stream_keep_the_client_bounded(
        data in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        let mut client = Replay::new(&[1, 2, 3], &[3], &[1, 2]);
        for w in points.windows(2) {
            client.feed(&data[w[0]..w[1]]);
            prop_assert_eq!(client.check(), Ok(()));
            if client.violations().bad_frame > 0 {
                prop_assert!(client.closed().is_some());
            }
        }
    }
}

#[test]
fn stray_frames_are_dropped_until_the_limit() {
    let mut client = Replay::new(&[1], &[], &[5]);
    for i in 0..MAX_STRAY_FRAMES {
        assert!(client.apply(AgentMsg::Pong {
            req: 100 + i as u32
        }));
    }
    // The answer that was asked for is still taken.
    assert!(client.apply(AgentMsg::Pong { req: 5 }));
    assert_eq!(client.buffered().replies, 1);
    assert!(!client.apply(AgentMsg::Exited {
        id: 9,
        status: ExitStatus::Code(0)
    }));
    let v = client.violations();
    assert_eq!((v.unsolicited_reply, v.unknown_exec), (MAX_STRAY_FRAMES, 1));
    assert!(client.closed().unwrap().contains("stray frames"));
}

#[test]
fn frames_after_an_exit_are_stray() {
    let mut client = Replay::new(&[1], &[], &[]);
    assert!(client.apply(AgentMsg::Exited {
        id: 1,
        status: ExitStatus::Code(0)
    }));
    assert!(client.apply(AgentMsg::Output {
        id: 1,
        stream: Stream::Stdout,
        data: vec![1; 10],
    }));
    assert!(client.apply(AgentMsg::StdinCredit { id: 1, bytes: 1 }));
    assert_eq!(client.violations().unknown_exec, 2);
    assert_eq!(client.buffered().stream_bytes, 0);
}

#[test]
fn stdin_credit_beyond_what_was_sent_is_dropped() {
    let mut client = Replay::new(&[1], &[], &[]);
    assert!(client.apply(AgentMsg::StdinCredit { id: 1, bytes: 1 }));
    assert_eq!(client.violations().excess_stdin_credit, 1);
    assert_eq!(client.check(), Ok(()));
}
