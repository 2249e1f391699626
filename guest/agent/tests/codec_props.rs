//! Property tests of the frame codec: every message survives a round trip however the
//! stream is split, and arbitrary bytes never panic the decoder or make it allocate beyond
//! one maximal frame.

use proptest::prelude::*;
use smolvm_agent::protocol::{
    encode_frame, read_frame, AgentMsg, Applied, ExecRequest, ExitStatus, FrameDecoder, HostMsg,
    ProtocolError, QuiesceReport, ResumeReport, Stream, User, WallClock, WinSize, HEADER_LEN,
    MAX_PAYLOAD,
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
