//! The agent's TOML config file: any text is folded into the flags' config or refused with
//! file, line and key, never a panic.
#![no_main]
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use tcpstate::args::{Cli, Command};
use tcpstate::config::file::{self as configfile, Given};

struct NoFlags;
impl Given for NoFlags {
    fn given(&self, _: &str) -> bool {
        false
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(Cli {
        command: Command::Agent(args),
    }) = Cli::try_parse_from(["tcpstate", "agent"])
    else {
        unreachable!("the defaults parse");
    };
    let mut cfg = args.config();
    if let Ok(fc) = configfile::parse("fuzz.toml", text) {
        let _ = configfile::apply("fuzz.toml", text, &fc, &mut cfg, &NoFlags);
    }
});
