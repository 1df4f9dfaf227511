//! Time as the kernel stamps events: CLOCK_MONOTONIC, and its conversion to wall-clock time.
use std::time::{SystemTime, UNIX_EPOCH};

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so of every event.
pub(crate) fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Wall clock milliseconds since the epoch of a CLOCK_MONOTONIC timestamp.
pub(crate) fn wall_ms(ts_ns: u64) -> u64 {
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    now_wall.saturating_sub(monotonic_ns().saturating_sub(ts_ns)) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_in_wall_clock_is_now() {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let converted = wall_ms(monotonic_ns());
        assert!(converted.abs_diff(wall) < 1_000, "{converted} vs {wall}");
    }
}
