//! The shipped monitoring in `deploy/monitoring`, checked against itself, the install and the
//! operator: one set of rules in two forms, scrape configurations that find the install's pods,
//! metric names that the operator exports, thresholds that follow the install's timeouts and
//! timings, a runbook and firing and silent rule tests for every alert. (The rule tests
//! themselves run under `promtool test rules` in `cargo xtask test`.)

use myapp_operator::leader::Timings;
use myapp_operator::telemetry::metrics::{Metrics, WEBHOOK_BUCKETS};
use myapp_operator::telemetry::myapps::Counts;
use myapp_operator::telemetry::process::MEMORY_LIMIT;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring");

fn read(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {full}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn docs(path: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// Every rule of `deploy/monitoring/rules.yaml`.
fn rules() -> Vec<Value> {
    let file = yaml("deploy/monitoring/rules.yaml");
    let groups = file["groups"].as_sequence().expect("groups");
    groups.iter().flat_map(|g| g["rules"].as_sequence().expect("rules").clone()).collect()
}

fn alerts() -> BTreeMap<String, Value> {
    rules().into_iter().filter_map(|r| Some((r["alert"].as_str()?.to_string(), r))).collect()
}

fn alert(name: &str) -> Value {
    alerts().remove(name).unwrap_or_else(|| panic!("no alert {name} in rules.yaml"))
}

/// A Prometheus duration (`30s`, `5m`, `1h`).
fn duration(text: &str) -> Duration {
    let (n, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {text}"));
    match unit {
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("duration {text}"),
    }
}

/// The number an expression compares against at its end (`... > 2.5`).
fn threshold(expr: &str) -> f64 {
    let last = expr.trim().rsplit(['>', '<']).next().expect("a comparison");
    last.trim().parse().unwrap_or_else(|_| panic!("no threshold at the end of {expr}"))
}

/// The labels of the operator's pods, as the Deployment gives them.
fn pod_labels() -> BTreeMap<String, String> {
    let d = yaml("deploy/manager/deployment.yaml");
    let labels = d["spec"]["template"]["metadata"]["labels"].as_mapping().expect("pod labels");
    labels.iter().map(|(k, v)| (k.as_str().expect("key").into(), v.as_str().expect("value").into())).collect()
}

#[test]
fn the_prometheus_rule_carries_exactly_the_groups_of_the_rule_file() {
    let plain = yaml("deploy/monitoring/rules.yaml");
    let rule = yaml("deploy/monitoring/prometheusrule.yaml");
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(rule["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert!(plain["groups"].as_sequence().is_some_and(|g| !g.is_empty()), "rules.yaml has groups");
    assert_eq!(
        rule["spec"]["groups"], plain["groups"],
        "prometheusrule.yaml drifted from rules.yaml: copy the groups of rules.yaml under its spec"
    );
    assert_eq!(plain.as_mapping().map(|m| m.len()), Some(1), "rules.yaml holds groups only");
}

#[test]
fn the_kustomization_ships_the_pod_monitor_the_rules_and_the_dashboard() {
    let k = yaml("deploy/monitoring/kustomization.yaml");
    let resources: Vec<&str> =
        k["resources"].as_sequence().expect("resources").iter().filter_map(Value::as_str).collect();
    let kinds: BTreeSet<String> = resources
        .iter()
        .flat_map(|r| docs(&format!("deploy/monitoring/{r}")))
        .filter_map(|d| d["kind"].as_str().map(str::to_string))
        .collect();
    assert_eq!(kinds, BTreeSet::from(["PodMonitor".to_string(), "PrometheusRule".to_string()]));
    assert_eq!(k["namespace"].as_str(), Some("myapp-system"));
    let files = &k["configMapGenerator"][0]["files"];
    assert_eq!(files[0].as_str(), Some("dashboard.json"), "the dashboard's ConfigMap comes from the one JSON file");
}

#[test]
fn the_pod_monitor_finds_the_operators_pods_on_their_metrics_port() {
    let pods = pod_labels();
    let pm = yaml("deploy/monitoring/podmonitor.yaml");
    let selector = pm["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        let (k, v) = (k.as_str().expect("key"), v.as_str().expect("value"));
        assert_eq!(pods.get(k).map(String::as_str), Some(v), "the pods lack the selected label {k}={v}");
    }
    assert_eq!(pm["metadata"]["namespace"].as_str(), Some("myapp-system"));
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    let port = endpoint["port"].as_str().expect("port name");
    let d = yaml("deploy/manager/deployment.yaml");
    let ports = d["spec"]["template"]["spec"]["containers"][0]["ports"].as_sequence().expect("ports");
    assert!(
        ports.iter().any(|p| p["name"].as_str() == Some(port) && p["containerPort"].as_u64() == Some(8081)),
        "the manager has no port {port} on 8081 (probes and /metrics)"
    );
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    // The job label the rules select: the value of the pods' label named by jobLabel.
    let job_label = pm["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(pods.get(job_label).map(String::as_str), Some("myapp-operator"));
}

#[test]
fn the_plain_scrape_config_finds_the_same_pods_under_the_same_job() {
    let pods = pod_labels();
    let config = yaml("deploy/monitoring/prometheus.yaml");
    assert_eq!(config["rule_files"][0].as_str(), Some("rules.yaml"));
    let job = &config["scrape_configs"][0];
    assert_eq!(job["job_name"].as_str(), Some("myapp-operator"));
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"].as_str(), Some("pod"));
    assert_eq!(sd["namespaces"]["names"][0].as_str(), Some("myapp-system"));
    let selector = sd["selectors"][0]["label"].as_str().expect("label selector");
    for pair in selector.split(',') {
        let (k, v) = pair.split_once('=').expect("key=value");
        assert_eq!(pods.get(k).map(String::as_str), Some(v), "the pods lack the selected label {pair}");
    }
    let keep = job["relabel_configs"].as_sequence().expect("relabel_configs").iter().find(|r| r["action"] == "keep");
    let port = keep.and_then(|r| r["regex"].as_str()).expect("a keep on the port name");
    let pm = yaml("deploy/monitoring/podmonitor.yaml");
    assert_eq!(Some(port), pm["spec"]["podMetricsEndpoints"][0]["port"].as_str(), "both scrape the same port");
    assert_eq!(job["scrape_interval"], pm["spec"]["podMetricsEndpoints"][0]["interval"], "and as often");
}

/// What a replica exports once every metric has a value.
fn every_series() -> String {
    let m = Metrics::default();
    m.reconciled("ok");
    m.write("deployment", "apply");
    m.webhook("/validate", true, 0.001);
    m.webhook_error("/validate", 400);
    m.certificate_loaded(2_000_000_000);
    Counts { by_condition: [[1; 3]; 3], not_ready_since: Some(1) }.record(&m);
    m.encode()
}

#[test]
fn no_label_takes_user_input() {
    let text = every_series();
    let keys: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('{')?.1.split_once('}'))
        .flat_map(|(labels, _)| labels.split(',').filter_map(|kv| kv.split_once('=').map(|(k, _)| k)))
        .collect();
    // Each takes its values from a fixed set: a path, a verdict, an HTTP status, a condition and
    // its status, a bucket bound, a resource kind and verb, a result kind, the version.
    let allowed = ["allowed", "code", "condition", "le", "path", "resource", "result", "status", "verb", "version"];
    assert!(keys.contains("condition") && keys.contains("code"), "{keys:?}");
    assert!(keys.iter().all(|k| allowed.contains(k)), "unexpected label keys: {keys:?}");
}

/// Every series name the operator exports once each metric has a value.
fn exported() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = every_series()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split([' ', '{']).next().map(str::to_string))
        .collect();
    // Exported only under a cgroup memory limit, which a test process may not have.
    names.insert(MEMORY_LIMIT.to_string());
    names
}

/// The metric names an expression reads (the operator's, the process's, and `up`).
fn referenced(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b(myapp_operator_[a-z_]+|process_[a-z_]+|up)\b").expect("regex");
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/monitoring/dashboard.json")).expect("dashboard.json is JSON")
}

fn panel_exprs(d: &serde_json::Value) -> Vec<(String, String)> {
    let panels = d["panels"].as_array().expect("panels");
    panels
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            targets.into_iter().map(move |t| (title.clone(), t["expr"].as_str().unwrap_or_default().to_string()))
        })
        .collect()
}

#[test]
fn rules_and_dashboard_read_only_metrics_the_operator_exports() {
    let exported = exported();
    let mut read = Vec::new();
    for (name, rule) in alerts() {
        read.push((name, rule["expr"].as_str().expect("expr").to_string()));
    }
    read.extend(panel_exprs(&dashboard()));
    assert!(read.len() > 20, "alerts and panels: {}", read.len());
    for (what, expr) in read {
        let names = referenced(&expr);
        assert!(!names.is_empty(), "{what}: `{expr}` reads no metric of the operator");
        for name in names {
            if name == "up" {
                assert!(expr.contains("up{job=\"myapp-operator\"}"), "{what}: `up` of another job in `{expr}`");
                continue;
            }
            assert!(exported.contains(&name), "{what}: `{name}` is not exported by the operator ({exported:?})");
            if !name.starts_with("myapp_operator_") {
                assert!(expr.contains("job=\"myapp-operator\""), "{what}: `{name}` of any job in `{expr}`");
            }
        }
    }
}

#[test]
fn the_dashboard_is_well_formed_and_asks_for_its_data_source() {
    let d = dashboard();
    assert_eq!(d["uid"].as_str(), Some("myapp-operator"));
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"));
    let panels = d["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().expect("title");
        assert_eq!(p["datasource"]["uid"].as_str(), Some("${datasource}"), "{title}");
        let (x, w) = (p["gridPos"]["x"].as_u64().expect("x"), p["gridPos"]["w"].as_u64().expect("w"));
        assert!(x + w <= 24, "{title} is wider than the dashboard");
        assert!(!p["targets"].as_array().expect("targets").is_empty(), "{title} has no query");
    }
}

#[test]
fn the_no_leader_alert_waits_a_lease_duration_plus_a_scrape_interval() {
    let pm = yaml("deploy/monitoring/podmonitor.yaml");
    let scrape = duration(pm["spec"]["podMetricsEndpoints"][0]["interval"].as_str().expect("interval"));
    let wait = Timings::DEFAULT.lease_duration + scrape;
    for name in ["MyAppOperatorNoLeader", "MyAppOperatorTwoLeaders"] {
        let for_ = duration(alert(name)["for"].as_str().expect("for"));
        assert_eq!(for_, wait, "{name}: `for` must be the lease duration plus the scrape interval");
    }
    // The leader's series vanish with it: the expression must hold on no series at all.
    assert!(alert("MyAppOperatorNoLeader")["expr"].as_str().expect("expr").contains("or vector(0)"));
}

#[test]
fn the_webhook_latency_alert_sits_below_the_api_servers_timeout_and_the_buckets_reach_past_it() {
    let timeouts: Vec<u64> = docs("deploy/webhook/webhooks.yaml")
        .iter()
        .flat_map(|d| d["webhooks"].as_sequence().cloned().unwrap_or_default())
        .map(|w| w["timeoutSeconds"].as_u64().expect("timeoutSeconds"))
        .collect();
    assert_eq!(timeouts.len(), 2, "both webhooks set timeoutSeconds");
    let timeout = *timeouts.iter().min().expect("a timeout") as f64;
    let slow = threshold(alert("MyAppOperatorWebhookSlow")["expr"].as_str().expect("expr"));
    assert!(slow < timeout && slow >= timeout / 2.0, "alert at {slow} s: near, and below, the {timeout} s timeout");
    let (start, factor, count) = WEBHOOK_BUCKETS;
    let largest = start * factor.powi(i32::from(count) - 1);
    assert!(largest > timeout, "the largest bucket, {largest} s, must exceed the {timeout} s timeout");
}

/// The `#### Name` headings of the README's Monitoring section.
fn runbooks() -> BTreeMap<String, String> {
    let readme = read("README.md");
    let start = readme.find("\n## Monitoring").expect("a Monitoring section in README.md");
    let rest = &readme[start + 1..];
    let section = &rest[..rest[1..].find("\n## ").map_or(rest.len(), |i| i + 1)];
    let mut out = BTreeMap::new();
    for part in section.split("\n#### ").skip(1) {
        let (name, body) = part.split_once('\n').unwrap_or((part, ""));
        let body = body.split("\n### ").next().unwrap_or_default();
        out.insert(name.trim().to_string(), body.trim().to_string());
    }
    out
}

#[test]
fn every_alert_has_a_runbook_in_the_readme() {
    let runbooks = runbooks();
    let alerts = alerts();
    for name in alerts.keys() {
        let body = runbooks.get(name).unwrap_or_else(|| panic!("README.md has no `#### {name}` runbook"));
        assert!(body.len() > 200, "the runbook of {name} is too short to say what it means and what to check");
        assert!(body.contains("Check"), "the runbook of {name} says what to check first");
    }
    let documented: BTreeSet<&String> = runbooks.keys().collect();
    let shipped: BTreeSet<&String> = alerts.keys().collect();
    assert_eq!(documented, shipped, "the README's runbooks and rules.yaml name the same alerts");
}

#[test]
fn every_alert_has_a_rule_test_where_it_fires_and_one_where_it_must_not() {
    let mut fires: BTreeSet<String> = BTreeSet::new();
    let mut silent: BTreeSet<String> = BTreeSet::new();
    let dir = format!("{DIR}/tests");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/monitoring/tests") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("read");
        let file: Value = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(file["rule_files"][0].as_str(), Some("../rules.yaml"), "{path:?} tests the shipped rules");
        for test in file["tests"].as_sequence().expect("tests") {
            for case in test["alert_rule_test"].as_sequence().cloned().unwrap_or_default() {
                let name = case["alertname"].as_str().expect("alertname").to_string();
                let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
                if expected > 0 { &mut fires } else { &mut silent }.insert(name);
            }
        }
    }
    assert!(files > 0, "no rule tests in {dir}");
    for name in alerts().keys() {
        assert!(fires.contains(name), "no rule test where {name} fires");
        assert!(silent.contains(name), "no rule test where {name} must not fire");
    }
}
