//! Waiting for a condition: the one poll loop of the task runner and the integration tests.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `check` every `every` until it yields a value; `None` once `deadline` has passed.
/// `check` runs at least once.
pub async fn until<T, F, Fut>(deadline: Instant, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`until`] `timeout` from now.
pub async fn within<T, F, Fut>(timeout: Duration, every: Duration, check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until(Instant::now() + timeout, every, check).await
}

/// [`within`], failing with `<what>: not within <timeout> s` when `check` yields nothing in time.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, every: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match within(timeout, every, check).await {
        Some(v) => Ok(v),
        None => anyhow::bail!("{what}: not within {} s", timeout.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn poll_returns_the_first_value_or_names_what_timed_out() {
        let mut calls = 0;
        let v = poll("third call", Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            let n = calls;
            async move { (n == 3).then_some(n) }
        })
        .await;
        assert_eq!(v.ok(), Some(3));
        let e = poll("never", Duration::from_millis(20), Duration::from_millis(5), || async { None::<()> }).await;
        assert!(e.err().is_some_and(|e| e.to_string().starts_with("never: not within")));
    }

    #[tokio::test]
    async fn a_past_deadline_still_checks_once() {
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(until(past, Duration::from_secs(60), || async { Some(7) }).await, Some(7));
        assert_eq!(until(past, Duration::from_secs(60), || async { None::<()> }).await, None);
    }
}
