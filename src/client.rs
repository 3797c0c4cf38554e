//! How the operator talks to the API server: who it says it is, a bound on every call, and how
//! its watches back off.
//!
//! # A bound on every call
//!
//! kube's client has connect and write timeouts but no read timeout (a read timeout would break
//! idle watches), so a request sent on a half-open connection waits for its answer forever: the
//! task that made it hangs, while `/livez` still says "ok". `CallTimeoutLayer` bounds the wait
//! for the response head of every request that is not a watch. A watch is bounded instead by the
//! watcher's own idle handling and backoff.
//!
//! Both of the operator's clients carry it: the one it reads with (and the certificate upkeep
//! writes with), and the fenced one the controller writes with. The elector bounds its calls
//! more tightly itself (half the renew deadline).

use http::Request;

/// The product token of the operator's User-Agent.
pub(crate) const USER_AGENT_PRODUCT: &str = "myapp-operator";

/// The User-Agent of replica `identity`: `myapp-operator/<version> (<identity>)`. The audit log
/// records it with every request, which is how the chaos suite and the tests tell the replicas'
/// writes apart ([`identity_in_user_agent`] reads it back).
pub fn user_agent(identity: &str) -> String {
    format!("{USER_AGENT_PRODUCT}/{} ({identity})", env!("CARGO_PKG_VERSION"))
}

/// The replica identity in a [`user_agent`], of any version; `None` for anyone else's.
pub fn identity_in_user_agent(user_agent: &str) -> Option<&str> {
    let rest = user_agent.strip_prefix(USER_AGENT_PRODUCT)?.strip_prefix('/')?;
    let (_, inner) = rest.split_once('(')?;
    let id = inner.strip_suffix(')')?.trim();
    (!id.is_empty()).then_some(id)
}

/// Backoff of every watch the operator keeps: from 200 ms, doubling, at most 5 s, with jitter,
/// reset by any event. kube's default grows to 30 s, and a cache waiting that long after an API
/// server restart is stale for all that time.
pub(crate) fn watch_backoff() -> kube::runtime::watcher::ExponentialBackoff {
    crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).watcher()
}
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long any API call may take to answer. The API server's own request timeout is 60 s; an
/// apply passes through admission webhooks whose timeouts are 10 s at most, so an answer later
/// than this is one that is not coming.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The error of a call that timed out.
#[derive(Debug, thiserror::Error)]
#[error("the API call did not answer within {0:?}")]
pub(crate) struct CallTimedOut(pub(crate) Duration);

/// Bounds every non-watch request by a timeout; see the [module documentation](self). With
/// [`CallTimeoutLayer::with_write_deadline`], every write (any method but `GET`) is bounded
/// more tightly, on the API server too.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallTimeoutLayer {
    call: Duration,
    write: Option<Duration>,
}

impl Default for CallTimeoutLayer {
    fn default() -> Self {
        Self::new(CALL_TIMEOUT)
    }
}

impl CallTimeoutLayer {
    /// Bounds every call but watches by `call`.
    pub(crate) fn new(call: Duration) -> Self {
        Self { call, write: None }
    }

    /// Bounds every write by `deadline` instead, and tells the API server the same in the
    /// `timeout` query parameter (a Go duration, as client-go sends it for a request with a
    /// timeout): the server sets it on the request's context from when it received the
    /// request, and abandons the write when it passes. See [`crate::controller::fenced`].
    pub(crate) fn with_write_deadline(mut self, deadline: Duration) -> Self {
        self.write = Some(deadline);
        self
    }
}

impl<S> tower::Layer<S> for CallTimeoutLayer {
    type Service = CallTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallTimeout { inner, timeout: self.call, write: self.write }
    }
}

/// The service of [`CallTimeoutLayer`].
#[derive(Clone, Debug)]
pub(crate) struct CallTimeout<S> {
    inner: S,
    timeout: Duration,
    write: Option<Duration>,
}

/// `uri` with `timeout=<ms>ms` in its query, replacing any `timeout` already there.
pub(crate) fn with_timeout(uri: &http::Uri, deadline: Duration) -> Result<http::Uri, http::Error> {
    let path = uri.path();
    let kept = uri.query().unwrap_or_default().split('&').filter(|kv| !kv.is_empty() && !kv.starts_with("timeout="));
    let query: Vec<String> =
        kept.map(str::to_string).chain(std::iter::once(format!("timeout={}ms", deadline.as_millis()))).collect();
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(format!("{path}?{}", query.join("&")).parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

/// True for a watch request (`?watch=true` or `?watch=1`), which stays open by design.
fn is_watch<B>(req: &Request<B>) -> bool {
    req.uri().query().unwrap_or_default().split('&').any(|kv| kv == "watch=true" || kv == "watch=1")
}

impl<S, B> tower::Service<Request<B>> for CallTimeout<S>
where
    S: tower::Service<Request<B>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let watch = is_watch(&req);
        let mut timeout = self.timeout;
        if let Some(deadline) = self.write.filter(|_| req.method() != http::Method::GET) {
            match with_timeout(req.uri(), deadline) {
                Ok(uri) => *req.uri_mut() = uri,
                Err(e) => return Box::pin(async move { Err(Box::new(e) as tower::BoxError) }),
            }
            timeout = deadline;
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            if watch {
                return call.await.map_err(Into::into);
            }
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(CallTimedOut(timeout)) as tower::BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api::FakeApi;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;
    use tower::ServiceBuilder;

    #[test]
    fn user_agents_round_trip() {
        let ua = user_agent("op-0-x");
        assert!(ua.starts_with("myapp-operator/"), "{ua}");
        assert_eq!(identity_in_user_agent(&ua), Some("op-0-x"));
        assert_eq!(identity_in_user_agent("myapp-operator/0.0.9 (old-1)"), Some("old-1"));
        assert_eq!(identity_in_user_agent("kube-controller-manager/v1.37.2"), None);
        assert_eq!(identity_in_user_agent("myapp-operator/0.1.0"), None);
        assert_eq!(identity_in_user_agent("myapp-operator-e2e/1 (x)"), None);
    }

    #[test]
    fn the_deadline_goes_into_the_query_once() {
        let uri: http::Uri =
            "/api/v1/namespaces/a/configmaps/x?fieldManager=m&timeout=30s&force=true".parse().expect("uri");
        let with = with_timeout(&uri, Duration::from_millis(400)).expect("uri");
        assert_eq!(with.to_string(), "/api/v1/namespaces/a/configmaps/x?fieldManager=m&force=true&timeout=400ms");
        let bare: http::Uri = "/api/v1/namespaces/a/configmaps".parse().expect("uri");
        assert_eq!(with_timeout(&bare, Duration::from_secs(1)).expect("uri").query(), Some("timeout=1000ms"));
    }

    #[test]
    fn watches_are_told_apart() {
        let req = |q: &str| Request::get(format!("/api/v1/configmaps?{q}")).body(()).expect("request");
        assert!(is_watch(&req("watch=true&resourceVersion=1")));
        assert!(is_watch(&req("labelSelector=a&watch=1")));
        assert!(!is_watch(&req("watch=false")));
        assert!(!is_watch(&req("fieldSelector=metadata.name%3Dwatch")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_fails_after_the_timeout() {
        let fake = FakeApi::default();
        fake.set_blackhole(true);
        let service =
            ServiceBuilder::new().layer(CallTimeoutLayer::new(Duration::from_secs(3))).service(fake.service());
        let api: Api<ConfigMap> = Api::namespaced(kube::Client::new(service, "default"), "a");
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(60), api.get_opt("x")).await;
        let err = result.expect("the call returns by itself").expect_err("a timeout error");
        assert!(err.to_string().contains("did not answer") || format!("{err:?}").contains("CallTimedOut"), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
