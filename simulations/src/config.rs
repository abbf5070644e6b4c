//! Scenario files: what a run simulates, in TOML.
//!
//! A scenario describes one federation (sites, network, faults, workload) and optionally a
//! `[sweep]` of values for a few keys; [`Scenario::variants`] expands it into one [`Variant`]
//! per combination, each a separate, independently seeded run. Every key has a default that
//! mirrors kaapana-node's own (its outbox, request timeout, ping interval, runner-lost and
//! give-up periods), so a scenario names only what it varies.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rng::Dist;

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML does not describe a scenario.
    #[error("scenario {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("scenario {name}: {what}")]
    Invalid {
        /// The scenario.
        name: String,
        /// What is wrong, in words.
        what: String,
    },
}

/// How messages travel between sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// kaapana-node: every message is pushed at once through the sender's durable outbox.
    Push,
    /// Kaapana's remote instances: every site asks each workflow owner for news every
    /// `poll_interval_s`; its own messages to that owner ride along on the poll.
    Poll,
}

impl Delivery {
    /// `push` or `poll`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Poll => "poll",
        }
    }
}

/// The simulated network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// One-way base latency of a link in milliseconds, drawn once per pair of sites.
    pub latency_ms: Dist,
    /// Extra delay of each transmission in milliseconds.
    pub jitter_ms: Dist,
    /// Probability that a transmission loses a packet; each loss costs `retransmit_ms` (the
    /// connection is TCP or QUIC: a loss delays, it does not drop).
    pub loss: f64,
    /// What one lost packet costs, in milliseconds (a retransmission timeout).
    pub retransmit_ms: f64,
    /// A site's uplink in Mbit/s, drawn once per site.
    pub uplink_mbit_s: Dist,
    /// A site's downlink in Mbit/s, drawn once per site.
    pub downlink_mbit_s: Dist,
    /// How long a silent peer stays "connected" after the link broke, in seconds (libp2p's
    /// ping timeout after the last successful ping).
    pub detect_s: Dist,
    /// A request without an answer fails after this many seconds (kaapana-node: 30).
    pub request_timeout_s: f64,
    /// Redials after a lost connection start at this many milliseconds and double
    /// (kaapana-node: 250 ms).
    pub redial_base_ms: f64,
    /// The longest wait between redials, in seconds (kaapana-node: 30).
    pub redial_max_s: f64,
    /// Keepalive pings per connection and direction every this many seconds (kaapana-node:
    /// 5); counted, not simulated one by one.
    pub ping_interval_s: f64,
    /// Transport bytes a pushed request and its answer cost beyond their payload (a yamux
    /// stream opened and closed, protocol negotiation, TLS record headers): an estimate.
    pub request_overhead_bytes: f64,
    /// Transport bytes of one libp2p ping round trip (32 bytes each way plus framing).
    pub ping_bytes: f64,
    /// Transport bytes a poll and its answer cost beyond their payload in the polling model
    /// (an HTTPS request line and headers with a bearer token, response headers, TLS record
    /// headers, on a kept-alive connection): an estimate.
    pub poll_overhead_bytes: f64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            latency_ms: Dist::lognormal(25.0, 0.6),
            jitter_ms: Dist::Shaped(crate::rng::Shape::Exp(1.0)),
            loss: 0.001,
            retransmit_ms: 200.0,
            uplink_mbit_s: Dist::lognormal(100.0, 0.5),
            downlink_mbit_s: Dist::lognormal(200.0, 0.5),
            detect_s: Dist::uniform(20.0, 25.0),
            request_timeout_s: 30.0,
            redial_base_ms: 250.0,
            redial_max_s: 30.0,
            ping_interval_s: 5.0,
            request_overhead_bytes: 120.0,
            ping_bytes: 130.0,
            poll_overhead_bytes: 700.0,
        }
    }
}

/// The sites: their data, compute, executors and how fast they handle messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    /// The dataset statistics workflows read. Sites advertise it per region, as
    /// `<dataset>-r<k>` for the sites `k * region_size ..`, so that a workflow can aggregate
    /// in stages: one job manifest lists at most 1,024 upstream results.
    pub dataset: String,
    /// Fraction of sites that hold the dataset (the others match no statistics query).
    pub dataset_fraction: f64,
    /// Sites per region.
    pub region_size: u32,
    /// Items (series) per site; one per-owner item token each in the ad.
    pub items: Dist,
    /// If non-zero: site `i` also holds dataset `cohort-<i % cohorts>` (for `best` workflows).
    pub cohorts: u32,
    /// Fraction of sites with a GPU.
    pub gpu_fraction: f64,
    /// CPU a site offers, in millicores.
    pub cpu_millis: Dist,
    /// From `Execute` to the container running, in seconds.
    pub executor_start_s: Dist,
    /// Probability that the executor cannot run a job (a retryable failure).
    pub executor_failure: f64,
    /// Probability that a job's container exits non-zero (a final failure).
    pub exit_failure: f64,
    /// Handling one inbound request (verify, one durable commit), in milliseconds; requests
    /// queue at a site one after another.
    pub process_request_ms: f64,
    /// Handling one message in a request, in milliseconds.
    pub process_message_ms: f64,
    /// Answering a poll that carries nothing to record (a read, no commit), in
    /// milliseconds.
    pub process_poll_ms: f64,
    /// After a restart, whether the jobs' containers are still there (the daemon crashed, not
    /// the machine): running jobs are re-attached instead of failed.
    pub containers_survive_crash: bool,
}

impl Default for SiteConfig {
    fn default() -> Self {
        Self {
            dataset: "lung-ct".to_owned(),
            dataset_fraction: 1.0,
            region_size: 1000,
            items: Dist::uniform(10.0, 100.0),
            cohorts: 0,
            gpu_fraction: 0.3,
            cpu_millis: Dist::uniform(2000.0, 32000.0),
            executor_start_s: Dist::uniform(0.5, 1.5),
            executor_failure: 0.0,
            exit_failure: 0.0,
            process_request_ms: 0.5,
            process_message_ms: 0.05,
            process_poll_ms: 0.05,
            containers_survive_crash: false,
        }
    }
}

/// The node settings that shape recovery (they become the cores' `SiteConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// A runner out of reach for longer than this is lost: its jobs that may move, move
    /// (kaapana-node's `[workflows] runner_lost_after_secs`, default 300).
    pub runner_lost_after_s: f64,
    /// A runner out of reach for longer than this is gone: its jobs that still wait for it
    /// fail, so that their workflows end (kaapana-node's `runner_give_up_after_secs`, default
    /// 86,400).
    pub runner_give_up_after_s: f64,
    /// The polling model's interval, in seconds.
    pub poll_interval_s: f64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self { runner_lost_after_s: 300.0, runner_give_up_after_s: 86_400.0, poll_interval_s: 5.0 }
    }
}

/// What a workflow does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkflowKind {
    /// Federated statistics: one job at every site whose ad matches (per region), partial
    /// aggregations per region at the owner when there is more than one region, and a final
    /// aggregation at the owner.
    Statistics,
    /// One job at the best matching site (it moves when its runner is lost), then a report at
    /// the owner.
    Best,
    /// A training (federated learning, a workflow with rounds): each round a train job at
    /// every site of region 0 that holds the dataset, then an aggregation at the owner whose
    /// model is the next round's input; a round closes when every site reported, or at its
    /// deadline once it has its quorum (`rounds`, `min_sites`, `round_deadline_s`, `late`,
    /// `straggler_fraction`, `straggler_job_s`).
    Training,
}

/// What a training does with updates that arrive after their round closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Late {
    /// The late jobs are cancelled when their round closes.
    Drop,
    /// The late jobs go on; an update that arrives before the next round closes is aggregated
    /// with that round's.
    Fold,
}

impl Late {
    /// `drop` or `fold`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Fold => "fold",
        }
    }

    /// The protocol's value.
    pub const fn updates(self) -> kaapana_protocol::LateUpdates {
        match self {
            Self::Drop => kaapana_protocol::LateUpdates::Drop,
            Self::Fold => kaapana_protocol::LateUpdates::Fold,
        }
    }
}

/// A training's quorum: how many sites' updates a round needs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quorum {
    /// An integer: this many sites.
    Sites(u32),
    /// A number with a fraction part, above 0 and at most 1: this fraction of the sites the
    /// training's query matches when it is submitted, rounded up (at least 1).
    Fraction(f64),
}

impl Quorum {
    /// The `min_sites` of a training whose query matches `matching` sites.
    pub fn resolve(self, matching: usize) -> u32 {
        match self {
            Self::Sites(n) => n,
            Self::Fraction(f) => {
                let n = (f * matching as f64).ceil().max(1.0);
                n.min(f64::from(u32::MAX)) as u32
            }
        }
    }

    fn is_valid(self) -> bool {
        match self {
            Self::Sites(n) => n >= 1,
            Self::Fraction(f) => f > 0.0 && f <= 1.0,
        }
    }
}

/// Workflows to submit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowConfig {
    /// What it does.
    pub kind: WorkflowKind,
    /// The owners, used in turn by the `count` repetitions.
    pub owners: Vec<u32>,
    /// When the first is submitted, in seconds.
    pub at_s: f64,
    /// How many to submit.
    pub count: u32,
    /// Between two submissions, in seconds.
    pub every_s: f64,
    /// The dataset its site jobs read: for `statistics` the base name (regions are added),
    /// for `best` a name where `{i}` becomes the repetition's index modulo the cohorts, for
    /// `training` the base name of region 0 (`<dataset>-r0`: a training's aggregate reads at
    /// most 1,024 updates, so it trains over the first `site.region_size` sites).
    pub dataset: String,
    /// Whether site jobs need a GPU (capability-selected subset).
    pub gpu: bool,
    /// Minimum CPU of a runner, in millicores.
    pub min_cpu_millis: u32,
    /// Retries of every job after retryable failures.
    pub max_retries: u32,
    /// How long a site job runs, in seconds (for `training`: a train job at a site that is
    /// not a straggler).
    pub site_job_s: Dist,
    /// How long an aggregation or report at the owner runs, in seconds.
    pub aggregate_job_s: Dist,
    /// What an aggregation adds per upstream result, in milliseconds.
    pub aggregate_per_input_ms: f64,
    /// A site job's result bundle, in KiB (for `training`: a site's update, uploaded to the
    /// owner; the model is the aggregation's result, stored at the owner).
    pub result_kib: Dist,
    /// `training`: the number of rounds (1 to 100,000).
    pub rounds: u32,
    /// `training`: the quorum, how many sites' updates a round needs: an integer is a number
    /// of sites, a number with a fraction part (e.g. `0.8`) a fraction of the sites the
    /// training's query matches when it is submitted, rounded up. A quorum above the number
    /// of matching sites is refused at submission; one the reachable sites cannot reach makes
    /// rounds wait past their deadline, and fails the training once the missing sites' jobs
    /// fail (e.g. given up after `node.runner_give_up_after_s`).
    pub min_sites: Quorum,
    /// `training`: how long a round waits for slow sites once it has its quorum, in seconds
    /// (whole seconds, at least 1; the manifest's `round_deadline`).
    pub round_deadline_s: f64,
    /// `training`: `"drop"` cancels the jobs still running when their round closes, `"fold"`
    /// lets them go on and aggregates their updates with the next round's if they arrive
    /// before it closes.
    pub late: Late,
    /// `training`: the fraction of sites that are stragglers (drawn once per site, the same
    /// for every training and every round; the stragglers at a smaller fraction are among
    /// those at every larger one). Their train jobs run `straggler_job_s` instead of
    /// `site_job_s`.
    pub straggler_fraction: f64,
    /// `training`: how long a straggler's train job runs, in seconds.
    pub straggler_job_s: Dist,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            kind: WorkflowKind::Statistics,
            owners: vec![0],
            at_s: 10.0,
            count: 1,
            every_s: 0.0,
            dataset: "lung-ct".to_owned(),
            gpu: false,
            min_cpu_millis: 0,
            max_retries: 3,
            site_job_s: Dist::lognormal(30.0, 0.5),
            aggregate_job_s: Dist::uniform(1.0, 3.0),
            aggregate_per_input_ms: 0.5,
            result_kib: Dist::lognormal(16.0, 0.5),
            rounds: 10,
            min_sites: Quorum::Fraction(0.8),
            round_deadline_s: 300.0,
            late: Late::Drop,
            straggler_fraction: 0.0,
            straggler_job_s: Dist::lognormal(900.0, 0.3),
        }
    }
}

/// A set of sites cut off from the rest for a while.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionConfig {
    /// Fraction of sites cut off (drawn at random).
    pub fraction: f64,
    /// When the cut happens, in seconds.
    pub start_s: f64,
    /// How long it lasts, in seconds.
    pub duration_s: f64,
    /// Whether workflow owners may be among the cut-off sites.
    pub include_owners: bool,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self { fraction: 0.1, start_s: 60.0, duration_s: 600.0, include_owners: false }
    }
}

/// Site crashes: each site crashes at most once, keeps its durable state and loses the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashConfig {
    /// Fraction of sites that crash.
    pub fraction: f64,
    /// When, in seconds.
    pub at_s: Dist,
    /// How long a crashed site stays down, in seconds.
    pub downtime_s: Dist,
    /// Whether workflow owners may crash.
    pub include_owners: bool,
}

impl Default for CrashConfig {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            at_s: Dist::uniform(20.0, 120.0),
            downtime_s: Dist::uniform(10.0, 120.0),
            include_owners: true,
        }
    }
}

/// Values to sweep; every combination is one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sweep {
    /// Federation sizes.
    pub sites: Vec<u32>,
    /// Fractions cut off by every `[[partition]]`.
    pub partition_fraction: Vec<f64>,
    /// Delivery models.
    pub delivery: Vec<Delivery>,
    /// What every `training` workflow does with late updates.
    pub late: Vec<Late>,
}

/// A scenario file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Its name: the stem of the CSV files it writes.
    pub name: String,
    /// What it shows, in words.
    pub description: String,
    /// The seed of every run.
    pub seed: u64,
    /// How many sites (unless swept).
    pub sites: u32,
    /// Push or poll (unless swept).
    pub delivery: Delivery,
    /// A run stops at this virtual time at the latest, in seconds.
    pub max_time_s: f64,
    /// Whether a run fails unless every workflow ended (finished, or failed with a reason).
    pub require_all_end: bool,
    /// The network.
    pub network: NetworkConfig,
    /// The sites.
    pub site: SiteConfig,
    /// Node settings.
    pub node: NodeConfig,
    /// Workflows.
    pub workflow: Vec<WorkflowConfig>,
    /// Partitions.
    pub partition: Vec<PartitionConfig>,
    /// Crashes.
    pub crashes: CrashConfig,
    /// Values to sweep.
    pub sweep: Sweep,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "scenario".to_owned(),
            description: String::new(),
            seed: 1,
            sites: 100,
            delivery: Delivery::Push,
            max_time_s: 4.0 * 3600.0,
            require_all_end: true,
            network: NetworkConfig::default(),
            site: SiteConfig::default(),
            node: NodeConfig::default(),
            workflow: vec![WorkflowConfig::default()],
            partition: Vec::new(),
            crashes: CrashConfig::default(),
            sweep: Sweep::default(),
        }
    }
}

/// One run of a scenario: the scenario with every swept key set.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// E.g. `sites=1000 delivery=poll`, or `base` without a sweep.
    pub label: String,
    /// The resolved scenario (its `sweep` is empty).
    pub scenario: Scenario,
    /// The fraction every partition cuts off (for reports; 0 without partitions).
    pub partition_fraction: f64,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a scenario; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let s: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(source),
        })?;
        s.validate()?;
        Ok(s)
    }

    fn invalid(&self, what: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { name: self.name.clone(), what: what.into() }
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let prob = |p: f64| (0.0..=1.0).contains(&p);
        if kaapana_protocol::validate_name("scenario name", &self.name).is_err() {
            return Err(self.invalid("its name must be a plain file name ([A-Za-z0-9._-])"));
        }
        let sizes: Vec<u32> =
            if self.sweep.sites.is_empty() { vec![self.sites] } else { self.sweep.sites.clone() };
        if sizes.iter().any(|&n| n < 2) {
            return Err(self.invalid("a federation needs at least 2 sites"));
        }
        let dists = [
            ("network.latency_ms", &self.network.latency_ms),
            ("network.jitter_ms", &self.network.jitter_ms),
            ("network.uplink_mbit_s", &self.network.uplink_mbit_s),
            ("network.downlink_mbit_s", &self.network.downlink_mbit_s),
            ("network.detect_s", &self.network.detect_s),
            ("site.items", &self.site.items),
            ("site.cpu_millis", &self.site.cpu_millis),
            ("site.executor_start_s", &self.site.executor_start_s),
            ("crashes.at_s", &self.crashes.at_s),
            ("crashes.downtime_s", &self.crashes.downtime_s),
        ];
        for (name, d) in dists {
            if !d.is_valid() {
                return Err(self.invalid(format!("{name} has invalid parameters")));
            }
        }
        if self.network.uplink_mbit_s.mean() <= 0.0 || self.network.downlink_mbit_s.mean() <= 0.0 {
            return Err(self.invalid("bandwidths must be positive"));
        }
        let probs = [
            ("network.loss", self.network.loss),
            ("site.dataset_fraction", self.site.dataset_fraction),
            ("site.gpu_fraction", self.site.gpu_fraction),
            ("site.executor_failure", self.site.executor_failure),
            ("site.exit_failure", self.site.exit_failure),
            ("crashes.fraction", self.crashes.fraction),
        ];
        for (name, p) in probs {
            if !prob(p) {
                return Err(self.invalid(format!("{name} must be between 0 and 1")));
            }
        }
        if self.network.loss >= 0.9 {
            return Err(self.invalid("network.loss must be below 0.9"));
        }
        if self.site.region_size == 0 || self.site.region_size > 1024 {
            return Err(self.invalid(
                "site.region_size must be 1..=1024 (a job manifest lists at most 1,024 inputs)",
            ));
        }
        if self.node.poll_interval_s <= 0.0 {
            return Err(self.invalid("node.poll_interval_s must be positive"));
        }
        let limits = [
            ("node.runner_lost_after_s", self.node.runner_lost_after_s),
            ("node.runner_give_up_after_s", self.node.runner_give_up_after_s),
        ];
        for (name, v) in limits {
            if !(0.0..=1e12).contains(&v) {
                return Err(self.invalid(format!("{name} must be between 0 and 10^12 seconds")));
            }
        }
        if self.network.request_timeout_s <= 0.0 || self.network.ping_interval_s <= 0.0 {
            return Err(
                self.invalid("network.request_timeout_s and ping_interval_s must be positive")
            );
        }
        if self.max_time_s <= 0.0 {
            return Err(self.invalid("max_time_s must be positive"));
        }
        for (i, w) in self.workflow.iter().enumerate() {
            if w.owners.is_empty() {
                return Err(self.invalid(format!("workflow {i} has no owner")));
            }
            if let Some(&o) = w.owners.iter().find(|&&o| sizes.iter().any(|&n| o >= n)) {
                return Err(self.invalid(format!("workflow {i}: owner {o} is not a site")));
            }
            if w.max_retries > kaapana_protocol::MAX_RETRIES {
                return Err(self.invalid(format!("workflow {i}: max_retries is at most 10")));
            }
            for (name, d) in [
                ("site_job_s", &w.site_job_s),
                ("aggregate_job_s", &w.aggregate_job_s),
                ("result_kib", &w.result_kib),
                ("straggler_job_s", &w.straggler_job_s),
            ] {
                if !d.is_valid() {
                    return Err(
                        self.invalid(format!("workflow {i}: {name} has invalid parameters"))
                    );
                }
            }
            if w.kind == WorkflowKind::Training {
                if !(1..=kaapana_protocol::MAX_ROUNDS).contains(&w.rounds) {
                    return Err(self.invalid(format!("workflow {i}: rounds must be 1 to 100000")));
                }
                if !w.min_sites.is_valid() {
                    return Err(self.invalid(format!(
                        "workflow {i}: min_sites is a number of sites (at least 1) or a fraction \
                         above 0 and at most 1"
                    )));
                }
                if !(1.0..=f64::from(u32::MAX)).contains(&w.round_deadline_s) {
                    return Err(self.invalid(format!(
                        "workflow {i}: round_deadline_s must be at least 1 second"
                    )));
                }
                if !prob(w.straggler_fraction) {
                    return Err(self.invalid(format!(
                        "workflow {i}: straggler_fraction must be between 0 and 1"
                    )));
                }
            }
            if w.kind == WorkflowKind::Best && w.dataset.contains("{i}") && self.site.cohorts == 0 {
                return Err(self
                    .invalid(format!("workflow {i} names cohort datasets but site.cohorts is 0")));
            }
        }
        for (i, p) in self.partition.iter().enumerate() {
            let fractions = if self.sweep.partition_fraction.is_empty() {
                vec![p.fraction]
            } else {
                self.sweep.partition_fraction.clone()
            };
            if fractions.iter().any(|&f| !prob(f)) {
                return Err(
                    self.invalid(format!("partition {i}: fraction must be between 0 and 1"))
                );
            }
        }
        if self.partition.len() > 64 {
            return Err(self.invalid("at most 64 partitions"));
        }
        Ok(())
    }

    /// One variant per combination of swept values, in the order sites, partition fraction,
    /// delivery, late updates (the last varies fastest).
    pub fn variants(&self) -> Vec<Variant> {
        fn axis<T: Copy>(values: &[T]) -> Vec<Option<T>> {
            if values.is_empty() { vec![None] } else { values.iter().copied().map(Some).collect() }
        }
        let mut out = Vec::new();
        for &n in &axis(&self.sweep.sites) {
            for &f in &axis(&self.sweep.partition_fraction) {
                for &d in &axis(&self.sweep.delivery) {
                    for &late in &axis(&self.sweep.late) {
                        let mut s = self.clone();
                        s.sweep = Sweep::default();
                        let mut label = Vec::new();
                        if let Some(n) = n {
                            s.sites = n;
                            label.push(format!("sites={n}"));
                        }
                        if let Some(f) = f {
                            for p in &mut s.partition {
                                p.fraction = f;
                            }
                            label.push(format!("cut={f}"));
                        }
                        if let Some(d) = d {
                            s.delivery = d;
                            label.push(format!("delivery={}", d.label()));
                        }
                        if let Some(late) = late {
                            for w in
                                s.workflow.iter_mut().filter(|w| w.kind == WorkflowKind::Training)
                            {
                                w.late = late;
                            }
                            label.push(format!("late={}", late.label()));
                        }
                        let partition_fraction = s.partition.first().map_or(0.0, |p| p.fraction);
                        let label =
                            if label.is_empty() { "base".to_owned() } else { label.join(" ") };
                        out.push(Variant { label, scenario: s, partition_fraction });
                    }
                }
            }
        }
        out
    }
}
