//! The smolvm guest agent: the host <-> guest protocol ([`protocol`]), the agent that serves
//! it ([`agent`]: PID 1 in the guest, or an ordinary process on the host for tests), its PID-1
//! duties ([`init`]) and the host-side client ([`client`]).

pub mod agent;
pub mod client;
pub mod init;
pub mod invoke;
pub mod log;
pub mod protocol;
pub mod sys;
