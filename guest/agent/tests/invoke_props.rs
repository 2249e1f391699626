//! Property tests of the invocation protocol's payload (docs/WARM.md): every invocation
//! survives a round trip, and arbitrary bytes never panic the decoder; what it accepts
//! encodes back to the same bytes (one encoding per invocation). The same for the exit
//! report a warm program may send after its run.

use proptest::prelude::*;
use smolvm_agent::invoke::{
    decode, encode, exit_report, parse_exit_report, Invocation, EXIT_REPORT_MAX,
};

fn field() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn invocation() -> impl Strategy<Value = Invocation> {
    (
        prop::collection::vec(field(), 0..6),
        prop::collection::vec(("[A-Za-z_][A-Za-z0-9_]{0,6}", field()), 0..5),
        field(),
        any::<bool>(),
    )
        .prop_map(|(argv, env, cwd, reseed)| Invocation {
            argv,
            env,
            cwd,
            reseed,
        })
}

proptest! {
    #[test]
    fn round_trip(inv in invocation()) {
        let bytes = encode(&inv).unwrap();
        prop_assert_eq!(decode(&bytes).unwrap(), inv);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(inv) = decode(&bytes) {
            prop_assert_eq!(encode(&inv).unwrap(), bytes);
        }
    }

    #[test]
    fn mutated_payloads_never_panic(inv in invocation(), at in any::<usize>(), b in any::<u8>()) {
        let mut bytes = encode(&inv).unwrap();
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        if let Ok(back) = decode(&bytes) {
            prop_assert_eq!(encode(&back).unwrap(), bytes);
        }
    }

    #[test]
    fn truncations_are_refused(inv in invocation(), cut in any::<usize>()) {
        let bytes = encode(&inv).unwrap();
        let cut = cut % bytes.len();
        prop_assert!(decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn exit_reports_round_trip_and_reject_the_rest(
        status in any::<u8>(),
        bytes in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let r = exit_report(status);
        prop_assert_eq!(parse_exit_report(r.as_bytes()).unwrap(), Some(status));
        match parse_exit_report(&bytes) {
            // Only the canonical form is whole.
            Ok(Some(n)) => prop_assert_eq!(exit_report(n).into_bytes(), bytes),
            // A partial report is the start of one, never longer than the longest.
            Ok(None) => prop_assert!(bytes.len() < EXIT_REPORT_MAX),
            Err(_) => {}
        }
    }
}
