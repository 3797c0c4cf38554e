//! Runs the controller exactly while this replica leads.

use super::elector::{Leadership, Stop};
use super::fence::{Fence, Mandate};
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a graceful shutdown waits for in-flight reconciles before dropping them.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Resolves when the leadership ends: it is withdrawn, or its `valid_until` passes unrenewed.
/// Never, without an election.
async fn ended(mandate: Mandate) {
    let Mandate::Elected(mut rx) = mandate else { return std::future::pending().await };
    loop {
        let current = *rx.borrow_and_update();
        let Some(until) = current else { return };
        if until <= Instant::now() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {
                if *rx.borrow() == Some(until) {
                    return;
                }
            }
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Waits until this replica leads (at once, without an election). False once `shutdown` turns
/// true, or a channel closes, first.
async fn leading(leadership: &mut Option<watch::Receiver<Leadership>>, shutdown: &mut watch::Receiver<bool>) -> bool {
    loop {
        if *shutdown.borrow() {
            return false;
        }
        let Some(leadership) = leadership.as_mut() else { return true };
        if leadership.borrow_and_update().is_some_and(|until| until > Instant::now()) {
            return true;
        }
        tokio::select! {
            changed = leadership.changed() => if changed.is_err() { return false },
            changed = shutdown.changed() => if changed.is_err() { return false },
        }
    }
}

/// For each leadership term: calls `start(fence, acquired_at)` and drives the future it returns
/// until the term ends, when the future is dropped at once (so no write leaves after that
/// point), or until `shutdown` turns true, when the future is expected to finish its in-flight
/// work by itself (it is dropped after [`SHUTDOWN_GRACE`]). Without an election
/// ([`Mandate::Unelected`]) the one term lasts until shutdown. Returns after shutdown, saying how
/// the elector must release the lease: at once if the controller stopped by itself (every write
/// it sent was answered), or after the safety margin if it had to be cancelled.
pub(crate) async fn supervise<F, Fut>(mandate: Mandate, mut shutdown: watch::Receiver<bool>, mut start: F) -> Stop
where
    F: FnMut(Fence, Instant) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut how = Stop::Release;
    let mut leadership = match &mandate {
        Mandate::Elected(rx) => Some(rx.clone()),
        Mandate::Unelected => None,
    };
    loop {
        if !leading(&mut leadership, &mut shutdown).await {
            return how;
        }
        let acquired = Instant::now();
        tracing::info!("leading: starting the controller");
        let term = start(Fence::of(mandate.clone()), acquired);
        let mut sd = shutdown.clone();
        let grace = async move {
            let _ = sd.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            _ = term => {
                tracing::info!("controller stopped");
                how = Stop::Release;
            }
            _ = ended(mandate.clone()) => {
                tracing::warn!("leadership ended: controller cancelled");
                how = Stop::Release;
            }
            _ = grace => {
                tracing::warn!("controller did not stop within the grace period: cancelled");
                how = Stop::ReleaseAfterMargin;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn controller_runs_only_while_leading() {
        let (lead_tx, lead_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let starts = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (s, r) = (starts.clone(), running.clone());
        let sup = tokio::spawn(supervise(Mandate::Elected(lead_rx), stop_rx.clone(), move |fence, _| {
            s.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            let mut stop = stop_rx.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                struct Guard(Arc<AtomicUsize>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _g = Guard(r);
                assert!(fence.check().is_ok());
                let _ = stop.wait_for(|s| *s).await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 0, "standby does not run the controller");

        lead_tx.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(running.load(Ordering::SeqCst), 1);

        // Renewed: the same term goes on.
        lead_tx.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!((starts.load(Ordering::SeqCst), running.load(Ordering::SeqCst)), (1, 1));

        // Not renewed: the deadline passes and the controller is dropped.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(running.load(Ordering::SeqCst), 0, "the controller must stop at valid_until");

        // A new term, then an explicit loss.
        lead_tx.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!((starts.load(Ordering::SeqCst), running.load(Ordering::SeqCst)), (2, 1));
        lead_tx.send_replace(None);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(running.load(Ordering::SeqCst), 0);

        // Shutdown while leading: the controller finishes by itself, then supervise returns.
        lead_tx.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop_tx.send_replace(true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(running.load(Ordering::SeqCst), 0);
        assert!(sup.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn fence_closes_with_the_deadline() {
        let (tx, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(1)));
        let fence = Fence::new(rx);
        assert!(fence.check().is_ok());
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert!(fence.check().is_err(), "an expired valid_until refuses writes");
        tx.send_replace(Some(Instant::now() + Duration::from_secs(1)));
        assert!(fence.check().is_ok());
        tx.send_replace(None);
        assert!(fence.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn without_election_the_controller_runs_at_once_until_shutdown() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let sup = tokio::spawn(supervise(Mandate::Unelected, stop_rx.clone(), move |fence, _| {
            s.fetch_add(1, Ordering::SeqCst);
            let mut stop = stop_rx.clone();
            async move {
                assert!(fence.check().is_ok(), "the only writer's fence is open");
                let _ = stop.wait_for(|s| *s).await;
            }
        }));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1, "one term, at once, that does not end by itself");
        stop_tx.send_replace(true);
        assert_eq!(sup.await.ok(), Some(Stop::Release));
    }
}
