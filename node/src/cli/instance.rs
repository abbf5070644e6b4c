//! `kaapana-node instance ...`: registering other instances by certificate exchange.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use kaapana_federation::{AllowList, Execution, InstanceRef, Policy};

use crate::admin;
use crate::api::views::{AddInstanceRequest, InstanceView};
use crate::cli::{CliError, Context as _, now};
use crate::client::ApiClient;
use crate::daemon::{RevocationView, RotationView};
use crate::data_dir::DataDir;

/// `kaapana-node instance ...`.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Write this instance's exchange bundle (certificate, name, addresses, signed) for
    /// another site's admin to `instance add`.
    Export {
        /// The file to write; default: standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Register another instance from its exchange bundle. Confirm the printed fingerprint
    /// with the other site's admin by phone (or pass --expect-fingerprint). Both sites must
    /// register each other before they can connect.
    Add {
        /// The bundle file the other site exported.
        file: PathBuf,
        /// What the instance may do here.
        #[command(flatten)]
        policy: PolicyArgs,
        /// Refuse the bundle unless its certificate has this fingerprint (as confirmed out of
        /// band; spaces and colons are ignored).
        #[arg(long, value_name = "FINGERPRINT")]
        expect_fingerprint: Option<String>,
    },
    /// List the registered instances and their policies.
    List,
    /// Unregister an instance, by name or instance id.
    Remove {
        /// Name or instance id (PeerId).
        instance: String,
    },
    /// Revoke an instance here: unregister it, close its connections at once, refuse its
    /// messages and any later registration of its key. Also for an instance that is not
    /// registered (name it by its id).
    Revoke {
        /// Name or instance id (PeerId).
        instance: String,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "revoked by the site's admin")]
        reason: String,
    },
    /// List the instances revoked here, or adopt a federation CA's revocation list (made
    /// with `ca revoke`): the daemon passes it on to every registered instance.
    Revocations {
        /// A revocation list file to import.
        #[arg(long, value_name = "FILE")]
        import: Option<PathBuf>,
    },
    /// Move this instance to a new key: makes a new key and certificate and sends a hand-over
    /// signed with the current key to every registered instance, which registers the new key
    /// in place of the old one (same name and policy). The daemon switches to the new key
    /// when it next starts and every registered instance has the hand-over (see --status).
    Rotate {
        /// Why (for the peers' audit logs).
        #[arg(long, default_value = "key rotation")]
        reason: String,
        /// Have the new certificate issued by this federation CA (a `ca create` directory);
        /// default: self-signed.
        #[arg(long, value_name = "DIR")]
        ca: Option<PathBuf>,
        /// Show which registered instances have the hand-over; change nothing.
        #[arg(long, conflicts_with_all = ["finish", "ca"])]
        status: bool,
        /// Switch to the prepared key now, even if some instances lack the hand-over (they
        /// must then register the new bundle by hand). Only with the daemon stopped.
        #[arg(long, conflicts_with = "ca")]
        finish: bool,
    },
}

/// What a registered instance may do here. Without flags it may do nothing.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// A workflow this instance may run here (repeatable): a workflow's name for container
    /// jobs, or the DAG id for jobs that run a DAG of this site's Airflow (Kaapana's
    /// allowed_dags), e.g. `--allow-workflow total-segmentator`.
    #[arg(long, value_name = "WORKFLOW")]
    allow_workflow: Vec<String>,
    /// Allow every workflow.
    #[arg(long, conflicts_with = "allow_workflow")]
    allow_any_workflow: bool,
    /// A dataset this instance's jobs may read here (repeatable).
    #[arg(long, value_name = "DATASET")]
    allow_dataset: Vec<String>,
    /// Allow every dataset.
    #[arg(long, conflicts_with = "allow_dataset")]
    allow_any_dataset: bool,
    /// Run this instance's jobs without local approval (default: each job waits for
    /// `job approve`).
    #[arg(long)]
    auto_execute: bool,
    /// Send job logs back to this instance with its results.
    #[arg(long)]
    share_logs: bool,
}

impl PolicyArgs {
    fn to_policy(&self) -> Result<Policy, CliError> {
        let list =
            |any: bool, names: &[String], what: &'static str| -> Result<AllowList, CliError> {
                if any {
                    return Ok(AllowList::Any);
                }
                for n in names {
                    kaapana_protocol::validate_name(what, n)?;
                }
                Ok(AllowList::Only(names.iter().cloned().collect::<BTreeSet<_>>()))
            };
        Ok(Policy {
            allowed_workflows: list(self.allow_any_workflow, &self.allow_workflow, "workflow")?,
            allowed_datasets: list(self.allow_any_dataset, &self.allow_dataset, "dataset")?,
            execution: if self.auto_execute { Execution::Automatic } else { Execution::Approval },
            share_logs: self.share_logs,
        })
    }
}

/// Runs an `instance` command: through the daemon if one runs, else on the data directory.
pub fn instance_command(dir: &DataDir, cmd: InstanceCommand) -> Result<(), CliError> {
    // With a daemon running, changes go through it (it holds the store and the connections).
    let daemon = ApiClient::connect(dir);
    match cmd {
        InstanceCommand::Export { out } => {
            let (text, fingerprint) = match &daemon {
                Some(api) => {
                    let text = api.get_text("/v1/bundle")?;
                    (text, admin::NodeFiles::open(dir)?.certificate.fingerprint())
                }
                None => admin::export_bundle(dir, now())?,
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, &text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    println!("Wrote {}", path.display());
                    println!("  fingerprint:  {fingerprint}");
                }
                None => {
                    std::io::stdout().write_all(text.as_bytes())?;
                    eprintln!("fingerprint: {fingerprint}");
                }
            }
        }
        InstanceCommand::Add { file, policy, expect_fingerprint } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read bundle {}", file.display()))?;
            let policy = policy.to_policy()?;
            let view = match &daemon {
                Some(api) => api.add_instance(&AddInstanceRequest {
                    bundle: text,
                    policy,
                    expect_fingerprint: expect_fingerprint.clone(),
                })?,
                None => {
                    let inst = admin::add_instance(
                        dir,
                        &text,
                        policy,
                        expect_fingerprint.as_deref(),
                        now(),
                    )?;
                    InstanceView::offline(&inst, 0)
                }
            };
            println!("Registered instance {} ({})", view.name, view.instance_id);
            println!("  fingerprint:  {}", view.fingerprint);
            if expect_fingerprint.is_none() {
                println!(
                    "  Confirm this fingerprint with {}'s admin out of band (e.g. by phone).",
                    view.name
                );
            }
            print_policy(&view.policy);
            println!(
                "  Registration is mutual: {} must also add this instance's bundle.",
                view.name
            );
        }
        InstanceCommand::List => {
            let all = match &daemon {
                Some(api) => api.instances()?,
                None => {
                    let node = admin::NodeFiles::open(dir)?;
                    let store = node.store()?;
                    let mut views = Vec::new();
                    for i in admin::list_instances_in(&store)? {
                        views.push(InstanceView::offline(&i, store.outbox_depth(&i.instance_id)?));
                    }
                    views
                }
            };
            if all.is_empty() {
                println!("No instances registered. Add one with `kaapana-node instance add FILE`.");
                return Ok(());
            }
            for (n, v) in all.iter().enumerate() {
                if n > 0 {
                    println!();
                }
                print_instance(v);
            }
        }
        InstanceCommand::Remove { instance } => {
            let removed = match &daemon {
                Some(api) => api.remove_instance(&instance)?,
                None => {
                    let which: InstanceRef = instance.parse()?;
                    InstanceView::offline(&admin::remove_instance(dir, &which)?, 0)
                }
            };
            println!("Removed instance {} ({})", removed.name, removed.instance_id);
        }
        InstanceCommand::Revoke { instance, reason } => {
            let view: RevocationView = match &daemon {
                Some(api) => api.post(
                    &format!("/v1/instances/{instance}/revoke"),
                    &crate::api::RevokeRequest { reason },
                )?,
                None => {
                    let which: InstanceRef = instance.parse()?;
                    (&crate::trust::revoke_offline(dir, &which, &reason, now())?).into()
                }
            };
            let name = if view.name.is_empty() { "(not registered)" } else { &view.name };
            println!("Revoked instance {name} ({})", view.instance_id);
            println!("  reason:       {}", view.reason);
        }
        InstanceCommand::Revocations { import } => {
            if let Some(file) = import {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let revoked: Vec<RevocationView> = match &daemon {
                    Some(api) => api.post(
                        "/v1/revocations",
                        &crate::api::ImportRevocationsRequest { list: text },
                    )?,
                    None => crate::trust::import_list_offline(dir, &text, now())?
                        .iter()
                        .map(Into::into)
                        .collect(),
                };
                if revoked.is_empty() {
                    println!("Nothing new: the list is not newer than the one held here.");
                }
                for r in &revoked {
                    println!("Revoked {} ({}): {}", r.name, r.instance_id, r.reason);
                }
                return Ok(());
            }
            let view: crate::daemon::RevocationsView = match &daemon {
                Some(api) => api.get("/v1/revocations")?,
                None => {
                    let store = admin::NodeFiles::open(dir)?.store()?;
                    let list_number = store
                        .meta(crate::trust::REVOCATION_LIST_NUMBER_META)?
                        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                        .map(u64::from_be_bytes);
                    let revoked = store.revocations()?.iter().map(Into::into).collect();
                    crate::daemon::RevocationsView { list_number, revoked }
                }
            };
            match view.list_number {
                Some(n) => println!("Federation CA revocation list: number {n}"),
                None => println!("Federation CA revocation list: none"),
            }
            if view.revoked.is_empty() {
                println!("No instance is revoked here.");
            }
            for r in &view.revoked {
                let name = if r.name.is_empty() { "(not registered)" } else { &r.name };
                println!("{name}  {}", r.instance_id);
                println!("  fingerprint:   {}", r.fingerprint);
                println!("  reason:        {} ({})", r.reason, r.source);
            }
        }
        InstanceCommand::Rotate { reason, ca, status, finish } => {
            if finish {
                if daemon.is_some() {
                    crate::cli::bail!("stop the daemon first: --finish switches the key files");
                }
                match crate::trust::finish_rotation(dir, true)? {
                    Some(id) => println!("Switched to the new key: instance id {id}"),
                    None => println!("No key rotation is prepared."),
                }
                return Ok(());
            }
            let Some(api) = &daemon else {
                crate::cli::bail!(
                    "start the daemon first (`kaapana-node run`): the hand-over is sent through it"
                );
            };
            let view: RotationView = if status {
                api.get("/v1/rotation")?
            } else {
                let ca_dir = ca.map(|p| p.display().to_string());
                api.post("/v1/rotation", &crate::daemon::RotateRequest { reason, ca_dir })?
            };
            if !view.in_progress {
                println!("No key rotation is prepared.");
                return Ok(());
            }
            println!(
                "New key: instance id {}",
                view.new_instance_id.as_deref().unwrap_or("(unreadable)")
            );
            println!(
                "  hand-over delivered to {} of {} registered instance(s)",
                view.instances.saturating_sub(view.pending.len()),
                view.instances
            );
            if view.pending.is_empty() {
                println!("  Restart the daemon to switch to the new key.");
            } else {
                println!("  waiting for: {}", view.pending.join(", "));
            }
        }
    }
    Ok(())
}

fn print_instance(v: &InstanceView) {
    println!("{}  {}", v.name, v.instance_id);
    let mut status = format!("  status:        {}", v.status);
    if let Some(seen) = &v.last_seen {
        status.push_str(&format!("; last seen {seen}"));
    }
    if let Some(rtt) = v.rtt_ms {
        status.push_str(&format!("; round trip {rtt:.2} ms"));
    }
    println!("{status}");
    println!("  fingerprint:   {}", v.fingerprint);
    println!("  certificate:   valid until {}", v.certificate_not_after);
    let p = &v.policy;
    println!(
        "  policy:        workflows {}; datasets {}; execution {}; logs {}",
        p.allowed_workflows,
        p.allowed_datasets,
        execution_word(p.execution),
        if p.share_logs { "shared" } else { "not shared" }
    );
    match &v.capabilities {
        Some(c) => {
            let datasets = if c.datasets.is_empty() {
                "none".to_owned()
            } else {
                c.datasets
                    .iter()
                    .map(|(n, items, _)| match c.modalities.get(n) {
                        Some(m) if !m.is_empty() => {
                            format!("{n} ({items} items: {})", super::dataset::modalities(m))
                        }
                        _ => format!("{n} ({items} items)"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "  capabilities:  node {}; executors {}; workflows {}; datasets {}; {} CPUs, {:.1} GiB memory, {} GPUs",
                c.node_version,
                if c.executors.is_empty() { "none".to_owned() } else { c.executors.join(", ") },
                if c.allowed_workflows.is_empty() {
                    "none".to_owned()
                } else {
                    c.allowed_workflows.join(", ")
                },
                datasets,
                f64::from(c.cpu_millis) / 1000.0,
                c.memory_bytes as f64 / f64::from(1u32 << 30),
                c.gpus
            );
        }
        None => println!("  capabilities:  not received"),
    }
    if v.outbox_depth > 0 {
        println!("  outbox:        {} message(s) waiting", v.outbox_depth);
    }
}

fn execution_word(e: Execution) -> &'static str {
    match e {
        Execution::Automatic => "automatic",
        Execution::Approval => "approval",
    }
}

fn print_policy(p: &Policy) {
    println!("  may run workflows: {}", p.allowed_workflows);
    println!("  on datasets:       {}", p.allowed_datasets);
    println!("  execution:         {}", execution_word(p.execution));
    println!("  logs shared:       {}", if p.share_logs { "yes" } else { "no" });
}
