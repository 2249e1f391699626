//! The smolvm guest agent: the host <-> guest protocol, the agent that serves it (PID 1 in the
//! guest, or an ordinary process on the host for tests) and the host-side client.

pub mod protocol;
