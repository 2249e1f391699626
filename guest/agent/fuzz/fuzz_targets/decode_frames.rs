//! Feeds arbitrary bytes to the frame decoder, both message directions, in two pieces split
//! at a point chosen by the input. Must never panic, hang or allocate past one frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_agent::protocol::{
    read_frame, AgentMsg, FrameDecoder, HostMsg, HEADER_LEN, MAX_PAYLOAD,
};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut host = FrameDecoder::new();
    let mut agent = FrameDecoder::new();
    for piece in [&data[..split], &data[split..]] {
        host.feed(piece);
        agent.feed(piece);
        while let Ok(Some(_)) = host.next_msg::<HostMsg>() {}
        while let Ok(Some(_)) = agent.next_msg::<AgentMsg>() {}
        assert!(host.pending() <= HEADER_LEN + MAX_PAYLOAD + data.len());
    }
    let mut r = data;
    while read_frame::<_, HostMsg>(&mut r).is_ok() {}
    let mut r = data;
    while read_frame::<_, AgentMsg>(&mut r).is_ok() {}
});
