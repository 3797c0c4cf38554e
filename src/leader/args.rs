//! The election's command-line flags.

use super::timings::{Timings, TimingsError};

/// How this replica runs for leadership. Flattened into the binary's `run` flags; each flag also
/// reads an environment variable. The timing defaults are [`Timings::DEFAULT`], stated once.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LeaseArgs {
    /// Run for leadership on a Lease (true), or reconcile unconditionally as a single replica.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "myapp-operator")]
    pub(crate) lease_name: String,
    /// Namespace of the Lease (default: POD_NAMESPACE, else myapp-system).
    #[arg(long, env = "POD_NAMESPACE", default_value = "myapp-system")]
    pub(crate) lease_namespace: String,
    /// How long a standby waits from the last change it saw before taking over.
    #[arg(long, env = "LEASE_DURATION", default_value_t = Timings::DEFAULT.lease_duration.into())]
    pub(crate) lease_duration: humantime::Duration,
    /// How long a leader tries to renew before stepping down.
    #[arg(long, env = "RENEW_DEADLINE", default_value_t = Timings::DEFAULT.renew_deadline.into())]
    pub(crate) renew_deadline: humantime::Duration,
    /// How often the leader renews and standbys poll.
    #[arg(long, env = "RETRY_PERIOD", default_value_t = Timings::DEFAULT.retry_period.into())]
    pub(crate) retry_period: humantime::Duration,
    /// Deadline of each of the controller's writes, told to the API server too (`?timeout=`);
    /// a failover on proof of death waits it out (plus 100 ms) before its first write.
    #[arg(long, env = "WRITE_TIMEOUT", default_value_t = Timings::DEFAULT.write_timeout.into())]
    pub(crate) write_timeout: humantime::Duration,
}

impl LeaseArgs {
    /// The timings these flags ask for, validated ([`Timings::validate`]): the one place they
    /// are read and checked.
    pub(crate) fn timings(&self) -> Result<Timings, TimingsError> {
        let timings = Timings {
            lease_duration: self.lease_duration.into(),
            renew_deadline: self.renew_deadline.into(),
            retry_period: self.retry_period.into(),
            write_timeout: self.write_timeout.into(),
        };
        timings.validate()?;
        Ok(timings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lease: LeaseArgs,
    }

    #[test]
    fn defaults_are_the_timings_defaults_and_flags_parse_durations() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.lease.timings(), Ok(Timings::default()));
        let cli = Cli::parse_from(["x", "--lease-duration=4s", "--renew-deadline=3s", "--retry-period=500ms"]);
        let timings = cli.lease.timings().expect("valid");
        assert_eq!(timings.retry_period, std::time::Duration::from_millis(500));
        assert_eq!(timings.lease_duration, std::time::Duration::from_secs(4));
        let cli = Cli::parse_from(["x", "--lease-duration=10s", "--renew-deadline=10s"]);
        assert!(matches!(cli.lease.timings(), Err(TimingsError::LeaseNotAboveRenewDeadline { .. })));
    }
}
