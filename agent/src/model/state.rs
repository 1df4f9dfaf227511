//! Sets of TCP states and their names as people write them.
use tcpstate_common::TcpState;

/// Number of state slots (`TcpState::index` is 0..12).
pub(crate) const STATES: usize = 12;

/// A set of states, one bit per [`TcpState::index`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StateSet(u16);

/// As `--check-config` shows it: `["syn_sent", "established"]`.
impl std::fmt::Debug for StateSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.states().map(|s| s.label()))
            .finish()
    }
}

impl StateSet {
    pub(crate) const fn of(states: &[TcpState]) -> StateSet {
        let mut bits = 0u16;
        let mut i = 0;
        while i < states.len() {
            bits |= 1 << states[i].index();
            i += 1;
        }
        StateSet(bits)
    }

    pub(crate) fn contains(self, s: TcpState) -> bool {
        self.0 & (1 << s.index()) != 0
    }

    pub(crate) fn insert(&mut self, s: TcpState) {
        self.0 |= 1 << s.index();
    }

    pub(crate) fn states(self) -> impl Iterator<Item = TcpState> {
        TcpState::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

/// Parses a state given as a label (`close_wait`) or a name (`CLOSE_WAIT`, `CLOSE-WAIT`,
/// `estab` as `ss` writes it).
pub(crate) fn parse_state(s: &str) -> Option<TcpState> {
    let norm = s.trim().to_ascii_lowercase().replace('-', "_");
    let norm = match norm.as_str() {
        "estab" => "established".to_string(),
        "fin_wait_1" => "fin_wait1".to_string(),
        "fin_wait_2" => "fin_wait2".to_string(),
        _ => norm,
    };
    TcpState::ALL.into_iter().find(|st| st.label() == norm)
}

/// The states whose durations get histograms by default: connect (`syn_sent`), accept
/// (`syn_recv`), the connection's useful life (`established`), and the ends operators chase
/// (`close_wait`, `fin_wait2`, `last_ack`).
pub(crate) const DEFAULT_DURATION_STATES: StateSet = StateSet::of(&[
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::CloseWait,
    TcpState::FinWait2,
    TcpState::LastAck,
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_by_label_or_name() {
        assert_eq!(parse_state("close_wait"), Some(TcpState::CloseWait));
        assert_eq!(parse_state("CLOSE-WAIT"), Some(TcpState::CloseWait));
        assert_eq!(parse_state("FIN_WAIT_2"), Some(TcpState::FinWait2));
        assert_eq!(parse_state("estab"), Some(TcpState::Established));
        assert_eq!(parse_state("napping"), None);
    }
}
