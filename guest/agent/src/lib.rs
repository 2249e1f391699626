//! The agent protocol, the agent itself and the host-side client.
