//! A ring buffer record, as the kernel hands it over: any bytes decode or fail, never panic.
//! (Self-transitions such as FIN_WAIT2 -> FIN_WAIT2 are real, so nothing is asserted of the
//! states.)
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = tcpstate::kernel::decode::decode(data) {
        // What decoded is whole: both addresses of one family.
        assert_eq!(t.local.is_ipv4(), t.remote.is_ipv4(), "{t:?}");
    }
});
