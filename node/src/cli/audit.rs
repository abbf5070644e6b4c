//! `kaapana-node audit ...`: listing and verifying this instance's audit log.
//!
//! With a daemon running, both go through its API (it holds the store; `verify` reads one
//! snapshot there); otherwise they open the store in the data directory.

use clap::Subcommand;

use crate::admin;
use crate::audit::{AuditEntryView, VerifyReport};
use crate::cli::{CliError, bail};
use crate::client::ApiClient;
use crate::data_dir::DataDir;

/// How many entries one API call of `audit list` fetches.
const PAGE: usize = 1000;

/// `kaapana-node audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the audit log's entries, oldest first (not verified: see `audit verify`).
    List {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0, value_name = "N")]
        after: u64,
    },
    /// Walk the audit log's hash chain and check every entry's signature with this instance's
    /// key; name the first entry that was altered or removed (exit status 1).
    Verify,
}

/// Runs an `audit` command: through the daemon if one runs, else on the data directory.
pub fn audit_command(dir: &DataDir, cmd: AuditCommand) -> Result<(), CliError> {
    let daemon = ApiClient::connect(dir);
    match cmd {
        AuditCommand::List { after } => {
            let entries = match &daemon {
                Some(api) => {
                    let mut all: Vec<AuditEntryView> = Vec::new();
                    loop {
                        let from = all.last().map_or(after, |e| e.seq);
                        let page: Vec<AuditEntryView> =
                            api.get(&format!("/v1/audit?after={from}&limit={PAGE}"))?;
                        let done = page.len() < PAGE;
                        all.extend(page);
                        if done {
                            break all;
                        }
                    }
                }
                None => {
                    let store = admin::NodeFiles::open(dir)?.store()?;
                    let raw = store.audit_entries(after, usize::MAX)?;
                    raw.iter().map(|(seq, v)| AuditEntryView::of(*seq, v)).collect()
                }
            };
            if entries.is_empty() {
                println!("No audit entries after {after}.");
            }
            for e in entries {
                println!("{:>6}  {}  {:<16}  {}  {}", e.seq, e.at, e.kind, e.subject, e.detail);
            }
        }
        AuditCommand::Verify => {
            let report: VerifyReport = match &daemon {
                Some(api) => api.get("/v1/audit/verify")?,
                None => {
                    let node = admin::NodeFiles::open(dir)?;
                    let keys = crate::trust::audit_keys(&node.dir, &node.certificate)?;
                    node.store()?.verify_audit(&keys)?.into()
                }
            };
            match (report.verified, report.error) {
                (Some(s), None) => {
                    println!("audit log verified: {} entries, last {}", s.entries, s.last_seq);
                    println!("  head sha256:  {}", s.head);
                }
                (_, error) => bail!(
                    "the audit log does not verify: {}",
                    error.unwrap_or_else(|| "no reason given".into())
                ),
            }
        }
    }
    Ok(())
}
