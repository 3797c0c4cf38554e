//! The `myapp-operator` command: `run` the operator, print the `crd`, or the `version`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use myapp_operator::api::MyApp;
use myapp_operator::manager::{self, RunArgs};

#[derive(Parser)]
#[command(name = "myapp-operator", version, about = "A high-availability Kubernetes operator for MyApp")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinition as YAML.
    Crd,
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    // rustls must have exactly one crypto provider, installed before any TLS config is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd_yaml()?);
            Ok(())
        }
        Command::Version => {
            println!("myapp-operator {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(manager::run(*args))
        }
    }
}

fn crd_yaml() -> anyhow::Result<String> {
    serde_yaml::to_string(&MyApp::crd()).context("serialize CRD")
}
