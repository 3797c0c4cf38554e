//! Traces leave the process: on SIGTERM, spans still in the batch are flushed before exit.

mod common;

use common::{TestNamespace, client, eventually};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_spans_are_flushed_on_sigterm() {
    let otlp = std::env::var("MYAPP_E2E_OTLP").expect("MYAPP_E2E_OTLP is set by `cargo xtask test`");
    let client = client().await;
    let ns = TestNamespace::new(&client, "flush").await;
    let service = format!("flush-test-{}", ns.name);
    let log = std::env::temp_dir().join(format!("{service}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_myapp-operator"))
        .args(["run", "--probe-addr=127.0.0.1:0", "--log-format=json"])
        // Its own Lease in its own namespace, watching only that namespace (empty): it leads
        // there without competing with the operator under test.
        .env("POD_NAMESPACE", &ns.name)
        .env("WATCH_NAMESPACE", &ns.name)
        .env("POD_NAME", "flush-test")
        .env("WEBHOOKS", "false")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_SERVICE_NAME", &service)
        // Far longer than the test: only the flush on shutdown can deliver the spans.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the operator");
    // Stops the process if the test fails before it does.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
    let _reap = Reap(child.id());
    eventually("the lease acquired", Duration::from_secs(30), || async {
        std::fs::read_to_string(&log).ok()?.contains("acquired the lease").then_some(())
    })
    .await;
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(status.success(), "graceful exit: {status:?}");
    let spans = eventually("the flushed spans in Jaeger", Duration::from_secs(15), || async {
        let n = common::spans_of(&common::jaeger_traces(&service, None, None, 20)?).count();
        (n > 0).then_some(n)
    })
    .await;
    assert!(spans >= 1);
    let _ = std::fs::remove_file(&log);
    ns.cleanup().await;
}
