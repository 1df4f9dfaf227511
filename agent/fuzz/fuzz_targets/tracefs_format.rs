//! The tracepoint's format file: any text parses to a layout or fails, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tcpstate::kernel::tracefs::parse_format(text);
    }
});
