//! The task runner: `cargo xtask <command>`. See `cargo xtask --help`.

mod alerts;
mod bench;
mod chaos;
mod cluster;
mod demo;
mod image;
mod install;
mod operator;
mod otel;
mod paths;
mod sh;
mod test;
mod tls;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Counts heap bytes in use, for the bench's bytes per cached object.
#[global_allocator]
static ALLOCATOR: bench::cache_cost::Counting = bench::cache_cost::Counting;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tasks of the myapp-operator workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
    /// kwok and Jaeger, built from their Go modules and run on 127.0.0.1, and one real node
    /// (containerd, kubelet, kube-proxy).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The main job: local control plane, three operator replicas, the example MyApps Ready.
    Demo(demo::DemoArgs),
    /// Scale: N MyApps to Ready, replica memory, acquire -> first reconcile with N present.
    Bench(bench::BenchArgs),
    /// The chaos suite: kill, stop, partition the leader under load; check the audit log.
    Chaos(chaos::ChaosArgs),
    /// Everything CI runs: lint, unit tests, end-to-end tests against a real API server.
    Test(test::TestArgs),
    /// The container image: a static release binary on scratch, built with buildah, then checked.
    Image(image::ImageArgs),
    /// The shipped alert rules alone: promtool check and test on deploy/monitoring (a step of
    /// `test`; builds promtool on first use).
    Rules,
    /// The shipped alert rules on a real Prometheus scraping the install's pods: a rollout fires
    /// nothing, no replica fires the no-leader alert, which resolves when they are back.
    Alerts(operator::TargetArgs),
    /// The operator upgraded from the previous version and rolled back, on the real node: MyApps
    /// stay Ready, no child is re-created, admissions answer, leadership passes between versions
    /// with no write outside it.
    Upgrade(operator::TargetArgs),
    /// The namespace-scoped install (deploy/overlays/namespaced) on the real node: Roles only in the
    /// managed namespaces, MyApps there Ready, one elsewhere left alone; then the default install again.
    Namespaced(operator::TargetArgs),
    /// The in-cluster trace pipeline of otel/ on the real node, with the operator exporting to it:
    /// a reconcile arrives in its Jaeger through the Collector.
    Otel(operator::TargetArgs),
    /// The images of otel/ (the OpenTelemetry Collector and Jaeger), built from their Go modules
    /// with buildah into the build cache; `--import` also imports them into the node.
    OtelImages(image::otel::OtelImagesArgs),
    /// Regenerate the staging `replace` block of the kubernetes wrapper module from upstream.
    GenGoMod,
    /// The webhook server alone, for `bench --webhook-abuse` (runs until stdin closes).
    #[command(hide = true)]
    WebhookServer,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build what is missing, start everything and wait until it is ready.
    Up,
    /// Stop exactly the processes `up` started.
    Down,
    /// Show what runs.
    Status,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Cluster { action } => match action {
            ClusterAction::Up => rt.block_on(cluster::up()),
            ClusterAction::Down => rt.block_on(cluster::down()),
            ClusterAction::Status => rt.block_on(cluster::status()),
        },
        Command::Bench(args) => rt.block_on(bench::bench(args)),
        Command::Chaos(args) => rt.block_on(chaos::chaos(args)),
        Command::Demo(args) => rt.block_on(demo::demo(args)),
        Command::Test(args) => rt.block_on(test::test(args)),
        Command::Image(args) => image::image(args),
        Command::Rules => test::rule_tests(),
        Command::Alerts(args) => rt.block_on(alerts::run(args)).map(|_| ()),
        Command::Namespaced(args) => rt.block_on(install::namespaced::run(args)).map(|_| ()),
        Command::Upgrade(args) => rt.block_on(install::upgrade::run(args)).map(|_| ()),
        Command::Otel(args) => rt.block_on(otel::run(args)).map(|_| ()),
        Command::OtelImages(args) => image::otel::run(args),
        Command::GenGoMod => cluster::gobuild::regenerate_kubernetes_replaces(),
        Command::WebhookServer => rt.block_on(bench::webhook::serve()),
    }
}
