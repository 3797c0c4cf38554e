//! `cargo xtask test`: everything `.ci/run` runs. Lint, unit tests, then the tests against a real
//! API server (the local control plane, or the cluster given) with the operator running.

use crate::chaos::{ChaosArgs, On};
use crate::operator::{self, TargetArgs};
use crate::sh::{cargo, run};
use crate::{cluster, cluster::node, install, paths};
use anyhow::{Result, bail};
use std::time::Instant;

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Skip `cargo fmt --check`, clippy and the doc-link check.
    #[arg(long)]
    no_lint: bool,
    /// Leave the local control plane running afterwards.
    #[arg(long)]
    keep_cluster: bool,
}

fn step(name: &str) -> Instant {
    println!("\n==> {name}");
    Instant::now()
}

/// Runs the whole suite.
pub async fn test(args: TestArgs) -> Result<()> {
    let all = Instant::now();
    if !args.no_lint {
        let t = step("lint: cargo fmt --check, cargo clippy --all-targets -- -D warnings");
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--check"]);
        run(fmt, "cargo fmt --check")?;
        let mut clippy = cargo();
        clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
        run(clippy, "cargo clippy")?;
        println!("    lint passed ({:.0} s)", t.elapsed().as_secs_f64());

        let t = step(
            "docs: cargo doc --no-deps of the operator, the chaos crate and the task runner, private items too, every intra-doc link resolved",
        );
        let mut doc = cargo();
        doc.args([
            "doc",
            "--no-deps",
            "-p",
            "myapp-operator",
            "-p",
            "chaos",
            "-p",
            "xtask",
            "--document-private-items",
        ]);
        doc.env("RUSTDOCFLAGS", "-D rustdoc::broken_intra_doc_links");
        run(doc, "cargo doc")?;
        println!("    docs passed ({:.0} s)", t.elapsed().as_secs_f64());
    }

    let t = step("unit tests (no cluster)");
    let mut unit = cargo();
    unit.args(["test", "--workspace"]);
    run(unit, "unit tests")?;
    println!("    unit tests passed ({:.0} s)", t.elapsed().as_secs_f64());

    let t = step("alert rules: promtool check config, check rules and test rules on deploy/monitoring");
    rule_tests()?;
    println!("    rule tests passed ({:.0} s)", t.elapsed().as_secs_f64());

    let t = step("cluster");
    let target = args.target.resolve().await?;
    println!("    cluster ready ({:.0} s)", t.elapsed().as_secs_f64());
    let result = against_cluster(&target).await;
    operator::stop_replicas();
    if target.started_here && !args.keep_cluster {
        cluster::down().await?;
    }
    let image_built = result?;

    if !image_built {
        step("image: static binary on scratch, built with buildah, linted and checked");
        crate::image::image(crate::image::ImageArgs { tag: "myapp-operator:dev".into() })?;
    }
    println!("\n==> all tests passed in {:.0} s", all.elapsed().as_secs_f64());
    Ok(())
}

/// The dashboard's panel queries as recording rules, for `promtool check rules` to parse:
/// Grafana's `$__rate_interval` becomes a fixed range.
fn panel_queries_as_rules(dashboard: &str) -> Result<String> {
    let d: serde_json::Value = serde_json::from_str(dashboard)?;
    let mut rules = Vec::new();
    for (i, panel) in d["panels"].as_array().into_iter().flatten().enumerate() {
        for (j, target) in panel["targets"].as_array().into_iter().flatten().enumerate() {
            let Some(expr) = target["expr"].as_str() else { continue };
            let record = format!("dashboard:panel_{i}_{j}");
            rules.push(serde_json::json!({"record": record, "expr": expr.replace("$__rate_interval", "5m")}));
        }
    }
    if rules.is_empty() {
        bail!("the dashboard has no panel query");
    }
    Ok(serde_yaml::to_string(&serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}))?)
}

/// The shipped monitoring's own checks, with the promtool of the `prometheus` component (built
/// on first use): the plain Prometheus configuration (which checks its rule file too), the rules,
/// every dashboard query (parsed as a recording rule), and every rule test in
/// `deploy/monitoring/tests/`. Fails on any failing case.
pub fn rule_tests() -> Result<()> {
    let promtool = crate::cluster::gobuild::component("prometheus")?.ensure()?.join("promtool");
    let dir = paths::repo().join("deploy").join("monitoring");
    let mut tests: Vec<_> = std::fs::read_dir(dir.join("tests"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    tests.sort();
    if tests.is_empty() {
        bail!("no rule tests in {}", dir.join("tests").display());
    }
    let promtool_in = |args: &[&str]| {
        let mut c = std::process::Command::new(&promtool);
        c.current_dir(&dir).args(args);
        c
    };
    run(promtool_in(&["check", "config", "prometheus.yaml"]), "promtool check config")?;
    run(promtool_in(&["check", "rules", "rules.yaml"]), "promtool check rules")?;
    let queries = paths::target_dir().join("dashboard-queries.yaml");
    std::fs::create_dir_all(paths::target_dir())?;
    std::fs::write(&queries, panel_queries_as_rules(&std::fs::read_to_string(dir.join("dashboard.json"))?)?)?;
    let mut check = promtool_in(&["check", "rules"]);
    check.arg(&queries);
    run(check, "promtool check rules on the dashboard's queries")?;
    let mut test = promtool_in(&["test", "rules"]);
    test.args(&tests);
    run(test, "promtool test rules")
}

/// The tests against the cluster; true when they built the image (for the real node).
async fn against_cluster(target: &operator::Target) -> Result<bool> {
    let since = chaos::audit::now();
    let t = step("end-to-end tests against the API server, with three operator replicas");
    let setup = operator::setup(target, false).await?;
    install::make_way_for_processes(&setup.client, target.local).await?;
    let replicas = operator::start_replicas(&setup.bin, &setup.kubeconfig, 3, &[], &operator::replica_env(target))?;
    operator::wait_ready(&replicas).await?;
    let logs = replicas.iter().map(|r| r.log.display().to_string()).collect::<Vec<_>>().join(":");

    let mut e2e = cargo();
    e2e.args([
        "test",
        "--test",
        "cluster",
        "--test",
        "e2e",
        "--test",
        "leader",
        "--test",
        "deploy",
        "--test",
        "telemetry",
        "--test",
        "webhook",
        "--",
        "--include-ignored",
    ])
    .env("KUBECONFIG", &target.kubeconfig)
    .env("MYAPP_E2E_OPERATOR_LOGS", logs);
    if let Some(kubectl) = crate::cluster::gobuild::kubectl() {
        e2e.env("MYAPP_E2E_KUBECTL", kubectl);
    }
    if target.local {
        e2e.env("MYAPP_E2E_AUDIT_LOG", paths::audit_log())
            .env("MYAPP_E2E_JAEGER", format!("http://127.0.0.1:{}", cluster::ports::JAEGER_QUERY))
            .env("MYAPP_E2E_OTLP", format!("http://127.0.0.1:{}", cluster::ports::JAEGER_OTLP));
    } else {
        // The audit log and Jaeger of a user's cluster are not ours to read.
        e2e.args(["--skip", "local_only_"]);
    }
    run(e2e, "end-to-end tests")?;
    println!("    end-to-end tests passed ({:.0} s)", t.elapsed().as_secs_f64());
    operator::stop_replicas();

    let t = step("chaos smoke: kill, term, pause, partition the leader, restart the API server");
    let _ = crate::chaos::scenarios(ChaosArgs::smoke(target.args(), On::Processes)).await?;
    println!("    chaos smoke passed ({:.0} s)", t.elapsed().as_secs_f64());
    let t = step("benchmark, quick profile (keeps `cargo xtask bench` from rotting)");
    crate::bench::bench(crate::bench::BenchArgs::quick(target.args())).await?;
    println!("    bench --quick passed ({:.0} s)", t.elapsed().as_secs_f64());
    let image_built = on_the_node(target).await?;
    if target.local {
        step("RBAC proof: nothing the operator's ServiceAccount asked was denied (audit log)");
        operator::rbac_proof(since)?;
    }
    Ok(image_built)
}

/// The install as users run it, on the real node: the image, `kubectl apply -k` (the install
/// test), the chaos smoke against its pods, and the hostile profile's short form. Skipped, with
/// the reason, when there is no real node; under CI (`CI` set) that fails the run instead. True
/// when it built the image.
async fn on_the_node(target: &operator::Target) -> Result<bool> {
    let why = if target.local {
        node::why_not()
    } else {
        Some("a user's cluster: the local image cannot be loaded there".to_string())
    };
    if let Some(why) = why {
        if std::env::var_os("CI").is_some() && target.local {
            bail!("the real node is required under CI, and it is not running: {why}");
        }
        println!("\n==> SKIPPED: the install test and the pod chaos need the real node ({why})");
        return Ok(false);
    }
    let t = step("image: static binary on scratch, built with buildah, linted and checked");
    crate::image::image(crate::image::ImageArgs { tag: "myapp-operator:dev".into() })?;
    println!("    image built ({:.0} s)", t.elapsed().as_secs_f64());

    let t = step("the install as users run it: kubectl apply -k deploy/overlays/local onto the real node");
    let client = cluster::client_from(&target.kubeconfig).await?;
    install::prepare(&client).await?;
    let mut test = cargo();
    test.args(["test", "--test", "install", "--", "--include-ignored", "--nocapture"])
        .env("KUBECONFIG", &target.kubeconfig)
        .env("MYAPP_E2E_NODE", node::NAME)
        .env("MYAPP_E2E_JAEGER", format!("http://127.0.0.1:{}", cluster::ports::JAEGER_QUERY));
    if let Some(kubectl) = crate::cluster::gobuild::kubectl() {
        test.env("MYAPP_E2E_KUBECTL", kubectl);
    }
    let result = run(test, "the install test");
    if result.is_err() {
        println!("{}", install::logs(&client).await);
    }
    result?;
    println!("    install test passed ({:.0} s)", t.elapsed().as_secs_f64());

    let result = on_the_pods(target).await;
    install::uninstall(&client).await?;
    result?;
    Ok(true)
}

/// What runs on the install's pods after the install test, in order; the first failure stops it.
async fn on_the_pods(target: &operator::Target) -> Result<()> {
    let t =
        step("upgrade and rollback: the previous version's install, this one's, the previous again, this one again");
    crate::install::upgrade::run(target.args()).await?;
    println!("    upgrade and rollback passed ({:.0} s)", t.elapsed().as_secs_f64());
    let t = step("chaos smoke against the pods: every pod scenario but pdb");
    crate::chaos::scenarios(ChaosArgs::smoke(target.args(), On::Pods)).await?;
    println!("    pod chaos smoke passed ({:.0} s)", t.elapsed().as_secs_f64());
    let t = step("hostile, short: parse-cost reviews and a connection flood on every pod for 30 s");
    crate::chaos::hostile::hostile(&target.args(), crate::chaos::hostile::SHORT).await?;
    println!("    hostile short form passed ({:.0} s)", t.elapsed().as_secs_f64());
    let t = step("alerts on a real Prometheus: a rollout fires nothing; no replica fires no-leader");
    crate::alerts::run(target.args()).await?;
    println!("    alerts passed ({:.0} s)", t.elapsed().as_secs_f64());
    let t = step("the namespace-scoped install: deploy/overlays/namespaced, Roles only where it manages MyApps");
    crate::install::namespaced::run(target.args()).await?;
    println!("    namespaced install passed ({:.0} s)", t.elapsed().as_secs_f64());
    let t = step("the in-cluster trace pipeline: otel/ on the node, a reconcile through its Collector into its Jaeger");
    crate::otel::run(target.args()).await?;
    println!("    in-cluster trace pipeline passed ({:.0} s)", t.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_panel_query_becomes_a_recording_rule_without_grafana_variables() {
        let dashboard = r#"{"panels": [
            {"type": "row", "title": "r"},
            {"targets": [{"expr": "rate(a_total[$__rate_interval])"}, {"expr": "up"}]},
            {"targets": [{"refId": "A"}]}
        ]}"#;
        let rules: serde_yaml::Value =
            serde_yaml::from_str(&panel_queries_as_rules(dashboard).expect("rules")).expect("yaml");
        let exprs: Vec<&str> = rules["groups"][0]["rules"]
            .as_sequence()
            .expect("rules")
            .iter()
            .filter_map(|r| r["expr"].as_str())
            .collect();
        assert_eq!(exprs, ["rate(a_total[5m])", "up"]);
        assert!(panel_queries_as_rules(r#"{"panels": []}"#).is_err(), "a dashboard without queries is refused");
    }
}
