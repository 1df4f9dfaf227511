//! Ring buffer bytes to a domain [`Transition`]: pure and length-checked.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcpstate_common::{AF_INET, AF_INET6, EVENT_SIZE, Event, InvalidState, TcpState};
use thiserror::Error;

use crate::model::event::Transition;

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes, expected {EVENT_SIZE}: agent and eBPF program disagree")]
    Length(usize),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown TCP state {}", .0.0)]
    State(InvalidState),
}

impl From<InvalidState> for DecodeError {
    fn from(e: InvalidState) -> Self {
        DecodeError::State(e)
    }
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Transition, DecodeError> {
    if bytes.len() != EVENT_SIZE {
        return Err(DecodeError::Length(bytes.len()));
    }
    // SAFETY: the length is checked above, `Event` is plain old data valid for every bit
    // pattern, and `read_unaligned` places no alignment demand on the ring's bytes.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    from_event(&ev)
}

/// Converts an [`Event`] to a [`Transition`].
pub(crate) fn from_event(ev: &Event) -> Result<Transition, DecodeError> {
    let (local, remote) = match ev.family {
        AF_INET => {
            let s: [u8; 4] = ev.saddr[..4].try_into().expect("4 bytes");
            let d: [u8; 4] = ev.daddr[..4].try_into().expect("4 bytes");
            (
                IpAddr::from(Ipv4Addr::from(s)),
                IpAddr::from(Ipv4Addr::from(d)),
            )
        }
        AF_INET6 => (
            IpAddr::from(Ipv6Addr::from(ev.saddr)),
            IpAddr::from(Ipv6Addr::from(ev.daddr)),
        ),
        other => return Err(DecodeError::Family(other)),
    };
    Ok(Transition {
        ts_ns: ev.ts_ns,
        sock: ev.skaddr,
        prev_state_ns: (ev.prev_state_ns != 0).then_some(ev.prev_state_ns),
        local: SocketAddr::new(local, ev.sport),
        remote: SocketAddr::new(remote, ev.dport),
        old: TcpState::try_from(ev.oldstate)?,
        new: TcpState::try_from(ev.newstate)?,
        netns: ev.netns,
        pid: ev.pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of an event, as the program writes them.
    fn encode(ev: &Event) -> [u8; EVENT_SIZE] {
        // SAFETY: `Event` is `#[repr(C)]` without padding (asserted in tcpstate-common), so all of
        // its EVENT_SIZE bytes are initialised and may be read as bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), EVENT_SIZE) };
        bytes.try_into().expect("EVENT_SIZE bytes")
    }

    fn v4_event() -> Event {
        let mut ev = Event {
            ts_ns: 5_000,
            skaddr: 0xffff_8880_1234_5678,
            prev_state_ns: 300,
            family: AF_INET,
            sport: 8080,
            dport: 40000,
            oldstate: TcpState::Established as u8,
            newstate: TcpState::CloseWait as u8,
            pid: 42,
            ..Event::default()
        };
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        ev
    }

    /// The ring_record fuzz target starts from this record (`UPDATE_SEEDS=1` rewrites it).
    #[test]
    fn the_fuzz_seed_is_this_record() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/ring_record/v4.bin");
        if std::env::var_os("UPDATE_SEEDS").is_some() {
            std::fs::write(path, encode(&v4_event())).unwrap();
        }
        let seed = std::fs::read(path).unwrap();
        assert_eq!(seed, encode(&v4_event()), "{path}: UPDATE_SEEDS=1");
        assert!(decode(&seed).is_ok());
    }

    #[test]
    fn decodes_ipv4() {
        let t = decode(&encode(&v4_event())).unwrap();
        assert_eq!(t.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.remote, "10.1.2.3:40000".parse().unwrap());
        assert_eq!((t.old, t.new), (TcpState::Established, TcpState::CloseWait));
        assert_eq!(t.prev_state_ns, Some(300));
        assert_eq!(t.sock, 0xffff_8880_1234_5678);
        assert_eq!(t.pid, 42);
    }

    #[test]
    fn decodes_ipv6_and_unknown_duration() {
        let mut ev = v4_event();
        ev.family = AF_INET6;
        ev.saddr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        ev.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        ev.prev_state_ns = 0;
        let t = decode(&encode(&ev)).unwrap();
        assert_eq!(t.local, "[::1]:8080".parse().unwrap());
        assert_eq!(t.remote, "[fd00::2]:40000".parse().unwrap());
        assert_eq!(t.prev_state_ns, None);
    }

    #[test]
    fn rejects_short_long_and_invalid() {
        let bytes = encode(&v4_event());
        assert_eq!(decode(&bytes[..71]), Err(DecodeError::Length(71)));
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::Length(73)));
        assert_eq!(decode(&[]), Err(DecodeError::Length(0)));

        let mut ev = v4_event();
        ev.newstate = 0;
        assert_eq!(
            decode(&encode(&ev)),
            Err(DecodeError::State(InvalidState(0)))
        );
        let mut ev = v4_event();
        ev.family = 1;
        assert_eq!(decode(&encode(&ev)), Err(DecodeError::Family(1)));
    }
}
