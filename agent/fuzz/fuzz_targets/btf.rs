//! The kernel's BTF blob: any bytes parse or fail, and lookups on what parsed never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = tcpstate::kernel::btf::Btf::parse(data) {
        let _ = tcpstate::kernel::btf::netns_offsets(&btf);
        let _ = btf.offset("sock_common", &["skc_net"]);
    }
});
