//! Capability matching: which instances a [`CapabilityQuery`] selects.
//!
//! The owner keeps the latest verified [`CapabilityAd`] of every instance it may send jobs to;
//! a job spec's [`RunnerSelector::Query`](kaapana_protocol::RunnerSelector::Query) is matched
//! against them here, without any I/O.

use std::cmp::Reverse;
use std::fmt;

use kaapana_protocol::{CapabilityAd, CapabilityQuery, InstanceId, Pick};

/// What the owner knows of one instance that may run jobs: its id, registered name, latest
/// verified capability ad, and whether it is connected now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its identity.
    pub instance: InstanceId,
    /// The name it is registered under here.
    pub name: String,
    /// Its latest verified capability ad.
    pub ad: CapabilityAd,
    /// Whether it is connected now.
    pub reachable: bool,
}

impl Candidate {
    /// Whether its ad satisfies `query` (the query's `pick` plays no part).
    pub fn matches(&self, query: &CapabilityQuery) -> bool {
        self.mismatch(query).is_none()
    }

    /// The first requirement of `query` its ad does not meet, in words (e.g. `has no GPU`), or
    /// `None` when it matches.
    pub fn mismatch(&self, query: &CapabilityQuery) -> Option<String> {
        let res = &self.ad.resources;
        if let Some(d) = &query.dataset
            && !self.ad.datasets.iter().any(|s| &s.name == d)
        {
            return Some(format!("has no dataset {d}"));
        }
        if query.gpu && res.gpus.is_empty() {
            return Some("has no GPU".to_owned());
        }
        if res.cpu_millis < query.min_cpu_millis {
            return Some(format!(
                "offers {} millicores of CPU, fewer than {}",
                res.cpu_millis, query.min_cpu_millis
            ));
        }
        if res.memory_bytes < query.min_memory_bytes {
            return Some(format!(
                "offers {} bytes of memory, fewer than {}",
                res.memory_bytes, query.min_memory_bytes
            ));
        }
        None
    }

    /// How many items its ad lists for `dataset` (0 without a dataset or when it has none).
    pub fn items(&self, dataset: Option<&str>) -> u64 {
        dataset.and_then(|d| self.ad.datasets.iter().find(|s| s.name == d)).map_or(0, |s| s.items)
    }
}

/// Orders candidates by name, then id: the stable order of the jobs a step expands into.
fn by_name(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    a.name.cmp(&b.name).then_with(|| a.instance.cmp(&b.instance))
}

/// The ranking of [`Pick::Best`]: reachable first, then most CPU, then most memory, then most
/// items of the queried dataset, then name and id.
fn rank<'a>(
    query: &CapabilityQuery,
    c: &'a Candidate,
) -> (bool, Reverse<u32>, Reverse<u64>, Reverse<u64>, &'a str, InstanceId) {
    (
        !c.reachable,
        Reverse(c.ad.resources.cpu_millis),
        Reverse(c.ad.resources.memory_bytes),
        Reverse(c.items(query.dataset.as_deref())),
        c.name.as_str(),
        c.instance,
    )
}

/// The candidates whose ads satisfy `query`, each instance once, by name then id.
pub(crate) fn matching<'a>(
    query: &CapabilityQuery,
    candidates: &'a [Candidate],
) -> Vec<&'a Candidate> {
    let mut out: Vec<&Candidate> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in candidates {
        // The first entry of an instance counts; later duplicates are ignored.
        if seen.insert(c.instance) {
            out.push(c);
        }
    }
    out.retain(|c| c.matches(query));
    out.sort_by(|a, b| by_name(a, b));
    out
}

/// The best of `candidates` for `query` by the ranking of [`Pick::Best`] (whatever the query's
/// own `pick`), among those that match and pass `keep`.
pub(crate) fn best<'a>(
    query: &CapabilityQuery,
    candidates: &'a [Candidate],
    keep: impl Fn(&Candidate) -> bool,
) -> Option<&'a Candidate> {
    matching(query, candidates)
        .into_iter()
        .filter(|c| keep(c))
        .min_by(|a, b| rank(query, a).cmp(&rank(query, b)))
}

/// Instances whose ads satisfy the query (dataset present by name, GPU if asked, cpu/memory
/// minimums), in a stable order (by name, then id). For [`Pick::Best`]: only the best one:
/// reachable first, then most cpu_millis, then most memory, then most items of the queried
/// dataset, then name.
///
/// Unreachable instances match too (messages to them are durable); an instance listed twice
/// counts once, with its first entry.
pub fn select_runners(query: &CapabilityQuery, candidates: &[Candidate]) -> Vec<InstanceId> {
    match query.pick {
        Pick::All => matching(query, candidates).into_iter().map(|c| c.instance).collect(),
        Pick::Best => best(query, candidates, |_| true).map(|c| c.instance).into_iter().collect(),
    }
}

/// Why no candidate matches `query`, in words: one reason per candidate (`site-a has no GPU;
/// site-b has no dataset lung-ct`), or that no instance has advertised its capabilities yet.
pub(crate) fn explain_no_match(query: &CapabilityQuery, candidates: &[Candidate]) -> String {
    if candidates.is_empty() {
        return "no instance has sent its capabilities yet (are the instances registered and \
                connected?)"
            .to_owned();
    }
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| by_name(a, b));
    sorted.dedup_by(|a, b| a.instance == b.instance);
    let reasons: Vec<String> = sorted
        .iter()
        .map(|c| match c.mismatch(query) {
            Some(why) => format!("{} {why}", c.name),
            None => format!("{} matches", c.name),
        })
        .collect();
    reasons.join("; ")
}

/// A query in words, e.g. `dataset lung-ct, GPU, at least 2000 millicores`, or `any instance`.
#[derive(Debug)]
pub(crate) struct QueryText<'a>(pub(crate) &'a CapabilityQuery);

impl fmt::Display for QueryText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.0;
        let mut parts: Vec<String> = Vec::new();
        if let Some(d) = &q.dataset {
            parts.push(format!("dataset {d}"));
        }
        if q.gpu {
            parts.push("GPU".to_owned());
        }
        if q.min_cpu_millis > 0 {
            parts.push(format!("at least {} millicores", q.min_cpu_millis));
        }
        if q.min_memory_bytes > 0 {
            parts.push(format!("at least {} bytes of memory", q.min_memory_bytes));
        }
        if parts.is_empty() {
            parts.push("any instance".to_owned());
        }
        if q.pick == Pick::Best {
            parts.push("best one".to_owned());
        }
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kaapana_protocol::{
        DatasetSummary, Gpu, Header, ItemToken, NameScope, Resources, Timestamp,
    };

    use super::*;

    fn id(n: u8) -> InstanceId {
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[n; 32]);
        InstanceId::from_bytes(&bytes).unwrap()
    }

    fn cand(
        n: u8,
        name: &str,
        cpu: u32,
        mem: u64,
        gpu: bool,
        datasets: &[(&str, u64)],
    ) -> Candidate {
        Candidate {
            instance: id(n),
            name: name.to_owned(),
            ad: CapabilityAd {
                header: Header::new(Timestamp::from_millis(0), Duration::from_secs(60)),
                sequence: 1,
                instance_name: name.to_owned(),
                node_version: "0.1.0".to_owned(),
                executors: vec![],
                allowed_images: vec![],
                allowed_workflows: NameScope::Any,
                datasets: datasets
                    .iter()
                    .map(|(d, items)| DatasetSummary {
                        name: (*d).to_owned(),
                        items: *items,
                        bytes: 0,
                        tokens: (0..*items).map(|i| ItemToken([i as u8; 32])).collect(),
                        modalities: Vec::new(),
                    })
                    .collect(),
                resources: Resources {
                    cpu_millis: cpu,
                    memory_bytes: mem,
                    gpus: if gpu {
                        vec![Gpu { model: "A100".to_owned(), memory_bytes: 1 << 34 }]
                    } else {
                        vec![]
                    },
                },
            },
            reachable: true,
        }
    }

    fn query(dataset: Option<&str>, gpu: bool, cpu: u32, mem: u64, pick: Pick) -> CapabilityQuery {
        CapabilityQuery {
            dataset: dataset.map(str::to_owned),
            gpu,
            min_cpu_millis: cpu,
            min_memory_bytes: mem,
            pick,
        }
    }

    fn sites() -> Vec<Candidate> {
        vec![
            cand(3, "site-c", 8000, 32 << 30, true, &[("lung-ct", 5)]),
            cand(1, "site-a", 4000, 16 << 30, false, &[("lung-ct", 10), ("brain-mr", 3)]),
            cand(2, "site-b", 16000, 64 << 30, true, &[("brain-mr", 7)]),
        ]
    }

    #[test]
    fn all_matches_come_by_name_and_filters_apply() {
        let s = sites();
        assert_eq!(
            select_runners(&query(None, false, 0, 0, Pick::All), &s),
            vec![id(1), id(2), id(3)]
        );
        assert_eq!(
            select_runners(&query(Some("lung-ct"), false, 0, 0, Pick::All), &s),
            vec![id(1), id(3)]
        );
        assert_eq!(select_runners(&query(None, true, 0, 0, Pick::All), &s), vec![id(2), id(3)]);
        assert_eq!(select_runners(&query(None, false, 8000, 0, Pick::All), &s), vec![id(2), id(3)]);
        assert_eq!(select_runners(&query(None, false, 0, 40 << 30, Pick::All), &s), vec![id(2)]);
        assert_eq!(select_runners(&query(Some("lung-ct"), true, 0, 0, Pick::All), &s), vec![id(3)]);
        assert!(select_runners(&query(Some("liver-ct"), false, 0, 0, Pick::All), &s).is_empty());
        // An instance listed twice counts once.
        let mut twice = s.clone();
        twice.push(s[0].clone());
        assert_eq!(select_runners(&query(None, true, 0, 0, Pick::All), &twice), vec![id(2), id(3)]);
    }

    #[test]
    fn best_prefers_reachable_then_cpu_memory_items_name() {
        let mut s = sites();
        assert_eq!(select_runners(&query(None, false, 0, 0, Pick::Best), &s), vec![id(2)]);
        assert_eq!(
            select_runners(&query(Some("lung-ct"), false, 0, 0, Pick::Best), &s),
            vec![id(3)]
        );
        s[2].reachable = false;
        assert_eq!(select_runners(&query(None, false, 0, 0, Pick::Best), &s), vec![id(3)]);
        // Equal resources: most items of the queried dataset, then the name.
        let mut s = vec![
            cand(1, "site-a", 1000, 1 << 30, false, &[("lung-ct", 3)]),
            cand(2, "site-b", 1000, 1 << 30, false, &[("lung-ct", 9)]),
            cand(3, "site-0", 1000, 1 << 30, false, &[("lung-ct", 9)]),
        ];
        assert_eq!(
            select_runners(&query(Some("lung-ct"), false, 0, 0, Pick::Best), &s),
            vec![id(3)]
        );
        s.pop();
        assert_eq!(
            select_runners(&query(Some("lung-ct"), false, 0, 0, Pick::Best), &s),
            vec![id(2)]
        );
        assert!(select_runners(&query(None, true, 0, 0, Pick::Best), &s).is_empty());
    }

    #[test]
    fn no_match_is_explained_per_instance() {
        let s = sites();
        let q = query(Some("lung-ct"), true, 9000, 0, Pick::All);
        assert_eq!(
            explain_no_match(&q, &s),
            "site-a has no GPU; site-b has no dataset lung-ct; \
             site-c offers 8000 millicores of CPU, fewer than 9000"
        );
        assert_eq!(QueryText(&q).to_string(), "dataset lung-ct, GPU, at least 9000 millicores");
        assert!(explain_no_match(&q, &[]).starts_with("no instance has sent its capabilities"));
    }
}
