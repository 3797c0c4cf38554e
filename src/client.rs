//! A bound on every API call the operator makes.
//!
//! kube's client has connect and write timeouts but no read timeout (a read timeout would break
//! idle watches), so a request sent on a half-open connection waits for its answer forever: the
//! task that made it hangs, while `/livez` still says "ok". [`CallTimeoutLayer`] bounds the wait
//! for the response head of every request that is not a watch. A watch is bounded instead by the
//! watcher's own idle handling and backoff.
//!
//! Both of the operator's clients carry it: the one it reads with (and the certificate upkeep
//! writes with), and the fenced one the controller writes with. The elector bounds its calls
//! more tightly itself (half the renew deadline).

use http::Request;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long any API call may take to answer. The API server's own request timeout is 60 s; an
/// apply passes through admission webhooks whose timeouts are 10 s at most, so an answer later
/// than this is one that is not coming.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The error of a call that timed out.
#[derive(Debug, thiserror::Error)]
#[error("the API call did not answer within {0:?}")]
pub struct CallTimedOut(pub Duration);

/// Bounds every non-watch request by a timeout; see the [module documentation](self).
#[derive(Clone, Copy, Debug)]
pub struct CallTimeoutLayer(pub Duration);

impl Default for CallTimeoutLayer {
    fn default() -> Self {
        Self(CALL_TIMEOUT)
    }
}

impl<S> tower::Layer<S> for CallTimeoutLayer {
    type Service = CallTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallTimeout { inner, timeout: self.0 }
    }
}

/// The service of [`CallTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct CallTimeout<S> {
    inner: S,
    timeout: Duration,
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let watch = is_watch(&req);
        let timeout = self.timeout;
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
        let service = ServiceBuilder::new().layer(CallTimeoutLayer(Duration::from_secs(3))).service(fake.service());
        let api: Api<ConfigMap> = Api::namespaced(kube::Client::new(service, "default"), "a");
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(60), api.get_opt("x")).await;
        let err = result.expect("the call returns by itself").expect_err("a timeout error");
        assert!(err.to_string().contains("did not answer") || format!("{err:?}").contains("CallTimedOut"), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
