//! The program's aya-log records, into `tracing`. The logger must be kept alive and polled.
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// The logger type `kernel::probe::load` hands out.
pub(crate) type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Registers the logger's fd with tokio; then [`run`] polls it.
pub(crate) fn register(logger: Logger) -> std::io::Result<AsyncFd<Logger>> {
    // SAFETY: the logger owns the log ring's fd, open and unchanged until the `AsyncFd` drops it.
    unsafe { AsyncFd::register(logger) }.map_err(std::io::Error::from)
}

/// Flushes records as they arrive, until `stop` changes.
pub(crate) async fn run(mut logger: AsyncFd<Logger>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            guard = logger.readable_mut() => match guard {
                Ok(mut g) => {
                    g.get_inner_mut().flush();
                    g.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "eBPF log map failed");
                    return;
                }
            },
            _ = stop.changed() => return,
        }
    }
}
