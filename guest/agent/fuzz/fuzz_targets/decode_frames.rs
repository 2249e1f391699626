//! Feeds arbitrary bytes to the frame decoder, both message directions, in two pieces split
//! at a point chosen by the input, and the same bytes as an agent's stream into the client's
//! frame handling (`client::Replay`: the state and rules of a real `Client`, without threads
//! or a socket) with three execs started (64-byte credit windows) and two requests
//! outstanding. Must never panic, hang or allocate past one frame, and the client
//! must never hold more than one credit window per stream or more answers than it asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_agent::client::{Replay, MAX_STRAY_FRAMES};
use smolvm_agent::protocol::{
    read_frame, AgentMsg, FrameDecoder, HostMsg, Stream, HEADER_LEN, MAX_PAYLOAD,
};

const WINDOW: u32 = 64;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut host = FrameDecoder::new();
    let mut agent = FrameDecoder::new();
    // Exec 3's output has no reader; exec 1's stdout is read between the pieces. Inputs are
    // at most a few KiB, so the windows are 64 bytes here: the fuzzer can overrun them.
    let mut client = Replay::with_window(&[1, 2, 3], &[3], &[1, 2], WINDOW);
    for piece in [&data[..split], &data[split..]] {
        host.feed(piece);
        agent.feed(piece);
        while let Ok(Some(_)) = host.next_msg::<HostMsg>() {}
        while let Ok(Some(_)) = agent.next_msg::<AgentMsg>() {}
        assert!(host.pending() <= HEADER_LEN + MAX_PAYLOAD + data.len());

        client.feed(piece);
        if let Err(e) = client.check() {
            panic!("client accounts broken: {e}");
        }
        let b = client.buffered();
        assert!(b.max_stream_bytes <= WINDOW as usize, "{b:?}");
        assert!(b.replies <= 2, "{b:?}");
        assert!(client.violations().stray() <= MAX_STRAY_FRAMES + 1);
        if client.violations().beyond_window + client.violations().bad_frame > 0 {
            assert!(client.closed().is_some());
        }
        client.read(1, Stream::Stdout, split * 5);
    }
    let mut r = data;
    while read_frame::<_, HostMsg>(&mut r).is_ok() {}
    let mut r = data;
    while read_frame::<_, AgentMsg>(&mut r).is_ok() {}
});
