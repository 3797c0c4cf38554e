//! The local control plane's Prometheus: a process on the host, like Jaeger, built from its Go
//! module ([`crate::cluster::gobuild`]). It runs `deploy/monitoring/prometheus.yaml` as shipped, pointed at
//! this cluster (service discovery through the admin kubeconfig instead of in-cluster
//! credentials) with the rules of `deploy/monitoring/rules.yaml`, and scrapes the operator's pods
//! over the real node's pod network. The HTTP API is what `demo` and `alerts` read.

use crate::{paths, sh};
use anyhow::{Context, Result, bail};
pub use chaos::plain_http::query_escape as encode;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Prometheus's HTTP port on loopback.
pub const PORT: u16 = super::access::ports::PROMETHEUS;
/// The name its process is recorded under.
pub const NAME: &str = "prometheus";

/// The scrape configuration the install ships, pointed at this cluster: service discovery
/// through `kubeconfig`, the rules of `deploy/monitoring/rules.yaml`.
pub fn config(shipped: &str, rules: &Path, kubeconfig: &Path) -> Result<String> {
    let mut v: serde_yaml::Value = serde_yaml::from_str(shipped)?;
    v["rule_files"] = serde_yaml::Value::Sequence(vec![rules.display().to_string().into()]);
    let jobs = v["scrape_configs"].as_sequence_mut().context("scrape_configs")?;
    for job in jobs {
        for sd in job["kubernetes_sd_configs"].as_sequence_mut().context("kubernetes_sd_configs")? {
            sd["kubeconfig_file"] = kubeconfig.display().to_string().into();
        }
    }
    Ok(serde_yaml::to_string(&v)?)
}

/// Starts Prometheus in `run/prometheus` with the shipped configuration and waits until it is
/// ready. `fresh` starts from an empty TSDB, so that no earlier sample (a chaos run's restarts,
/// say) weighs on an alert.
pub async fn start(run: &Path, bin: &Path, fresh: bool) -> Result<sh::Proc> {
    let dir = run.join(NAME);
    if fresh {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    let monitoring = paths::repo().join("deploy/monitoring");
    let shipped = std::fs::read_to_string(monitoring.join("prometheus.yaml"))?;
    let file = dir.join("prometheus.yaml");
    std::fs::write(&file, config(&shipped, &monitoring.join("rules.yaml"), &paths::kubeconfig())?)?;
    // A Prometheus just stopped may hold the port for a moment while it shuts down.
    let free = chaos::wait::within(Duration::from_secs(10), Duration::from_millis(100), || async {
        (!sh::port_in_use(PORT)).then_some(())
    });
    if free.await.is_none() {
        bail!("port 127.0.0.1:{PORT} is in use: is another Prometheus running?");
    }
    let proc = sh::spawn(
        run,
        NAME,
        bin,
        &[
            format!("--config.file={}", file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{PORT}"),
            "--enable-feature=exemplar-storage".into(),
        ],
        &[],
    )?;
    super::access::wait_for(run, &[&proc], "prometheus", Duration::from_secs(30), || async {
        matches!(chaos::plain_http::get(PORT, "/-/ready"), Ok((200, _)))
    })
    .await?;
    Ok(proc)
}

/// Stops the recorded Prometheus and starts it again on an empty TSDB.
pub async fn restart_fresh(bin: &Path) -> Result<sh::Proc> {
    let run = paths::run_dir();
    for (name, pid, recorded) in sh::recorded(&run) {
        if name == NAME {
            sh::stop(&run, NAME, pid, &recorded, Duration::from_secs(5));
        }
    }
    let proc = start(&run, bin, true).await?;
    println!("==> Prometheus on http://127.0.0.1:{PORT}/, fresh (log {})", sh::log_file(&run, NAME).display());
    Ok(proc)
}

/// GETs `path` from Prometheus, as JSON.
pub fn api(path: &str) -> Result<Value> {
    let (code, body) = chaos::plain_http::get(PORT, path)?;
    if code != 200 {
        bail!("prometheus {path}: {code} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// The answer to the instant query `q`.
pub fn instant(q: &str) -> Result<Value> {
    api(&format!("/api/v1/query?query={}", encode(q)))
}

/// The value of an instant query with a single scalar-like result, if any.
pub fn query(q: &str) -> Option<f64> {
    let v = instant(q).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// The operator's alerts in a state (`firing` or `pending`), by name.
pub fn alerts(state: &str) -> Result<Vec<String>> {
    let v = api("/api/v1/alerts")?;
    Ok(v["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["state"] == state)
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                .filter(|n| n.starts_with("MyAppOperator"))
                .collect()
        })
        .unwrap_or_default())
}

/// Every alerting rule Prometheus evaluates, with its state (`inactive`, `pending`, `firing`).
pub fn rule_states() -> Result<Vec<(String, String)>> {
    let v = api("/api/v1/rules?type=alert")?;
    let groups = v["data"]["groups"].as_array().context("no rule groups")?;
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| Some((r["name"].as_str()?.to_string(), r["state"].as_str()?.to_string())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_pointed_at_this_cluster_and_nothing_else_changes() {
        let shipped =
            std::fs::read_to_string(paths::repo().join("deploy/monitoring/prometheus.yaml")).expect("prometheus.yaml");
        let out = config(&shipped, Path::new("/r/rules.yaml"), Path::new("/k/kubeconfig")).expect("config");
        let before: serde_yaml::Value = serde_yaml::from_str(&shipped).expect("yaml");
        let after: serde_yaml::Value = serde_yaml::from_str(&out).expect("yaml");
        assert_eq!(after["rule_files"][0], "/r/rules.yaml");
        let sd = &after["scrape_configs"][0]["kubernetes_sd_configs"][0];
        assert_eq!(sd["kubeconfig_file"], "/k/kubeconfig");
        assert_eq!(sd["namespaces"], before["scrape_configs"][0]["kubernetes_sd_configs"][0]["namespaces"]);
        assert_eq!(after["scrape_configs"][0]["relabel_configs"], before["scrape_configs"][0]["relabel_configs"]);
        assert_eq!(after["global"], before["global"]);
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(encode(r#"up{job="x"} == 1"#), "up%7Bjob%3D%22x%22%7D%20%3D%3D%201");
        assert_eq!(encode("sum(a_b)"), "sum%28a_b%29");
    }
}
