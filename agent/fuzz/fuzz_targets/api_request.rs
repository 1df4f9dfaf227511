//! A request line from the local API socket: parses or gets an error, never panics; what
//! parses serialises and parses again to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = tcpstate::serve::api::protocol::parse_request(data) {
        let line = serde_json::to_vec(&req).expect("a request serialises");
        let again = tcpstate::serve::api::protocol::parse_request(&line).expect("what we write parses");
        assert_eq!(again, req);
    }
});
