//! The kubelet's reports about the Lease holder's pod, for [`super::proof::reported_exited`]:
//! a watch of that one pod (list and watch by name; RBAC: `list`, `watch` on pods in the
//! operator's namespace), followed while another replica holds the Lease.

use super::proof::Incarnation;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};

/// The pod followed: its namespace and name, and its events.
struct Followed {
    pod: (String, String),
    events: BoxStream<'static, watcher::Result<Event<Pod>>>,
}

/// Follows the holder's pod. A pod that cannot be read (403) is reported once in the log: the
/// replica then takes over only on expiry, and keeps trying quietly, in case RBAC is fixed.
pub(crate) struct HolderPod {
    client: Client,
    followed: Option<Followed>,
    told_unreadable: bool,
}

/// True when `e` is the API server refusing us the pods.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

impl HolderPod {
    /// Follows nothing yet.
    pub(crate) fn new(client: Client) -> Self {
        Self { client, followed: None, told_unreadable: false }
    }

    /// Follows the pod of `holder`, or nothing. A change of pod starts a new watch, whose first
    /// list reports the pod's current status.
    pub(crate) fn follow(&mut self, holder: Option<&Incarnation>) {
        let wanted = holder.map(|h| (h.namespace.clone(), h.pod.clone()));
        if wanted == self.followed.as_ref().map(|f| f.pod.clone()) {
            return;
        }
        self.followed = wanted.map(|(ns, name)| {
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let events = watcher(api, config).backoff(crate::client::watch_backoff()).boxed();
            Followed { pod: (ns, name), events }
        });
    }

    /// The next report of the followed pod; never resolves while nothing is followed. A deleted
    /// pod is no report: its absence proves nothing.
    pub(crate) async fn next(&mut self) -> Pod {
        loop {
            let Some(f) = self.followed.as_mut() else { return std::future::pending().await };
            match f.events.next().await {
                Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => return pod,
                Some(Ok(_)) => {}
                Some(Err(e)) if forbidden(&e) => {
                    if !self.told_unreadable {
                        self.told_unreadable = true;
                        tracing::warn!(
                            error = %e,
                            "cannot read pods: no takeover on proof of death, failover waits for lease expiry"
                        );
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "watching the holder's pod"),
                None => self.followed = None,
            }
        }
    }
}
