//! `cargo xtask chaos [--profile smoke|full|hostile] [--target processes|pods]`: kill, stop,
//! partition the leader (and restart the API server) under a steady workload, then check the
//! invariants from the audit log; or, with `hostile`, attack every replica at once.
//! The ground-truth logic (audit parsing, invariants, report, fault proxy) is in the `chaos` crate.

mod args;
pub mod hostile;
mod pod_faults;
pub mod pods;
mod processes;
pub mod run;

use anyhow::{Result, bail};
pub use args::{ChaosArgs, On, Profile, Scenario};
use chaos::report::Report;

/// Runs `cargo xtask chaos`: the hostile profile, or the scenarios against pods or processes.
pub async fn chaos(args: ChaosArgs) -> Result<()> {
    if args.profile == Profile::Hostile {
        return hostile::chaos(&args).await;
    }
    scenarios(args).await.map(|_| ())
}

/// The scenarios of a smoke or full run, against the install's pods or operator processes;
/// fails when an invariant is broken.
pub async fn scenarios(args: ChaosArgs) -> Result<Report> {
    match (args.profile, args.on) {
        (Profile::Hostile, _) => bail!("the hostile profile has a report of its own: run it through `chaos`"),
        (_, On::Pods) => pods::chaos(&args, args.rounds.unwrap_or(args.profile.rounds(On::Pods))).await,
        (_, On::Processes) => processes::chaos(args).await,
    }
}
