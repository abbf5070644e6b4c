//! What one registered instance may do here: its [`Policy`].

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use kaapana_protocol::{ValidationError, validate_name};
use serde::{Deserialize, Serialize};

/// A set of allowed names (workflows, datasets): everything, or exactly the listed names.
///
/// `Only` with an empty set allows nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllowList {
    /// Every name is allowed.
    Any,
    /// Only these names are allowed.
    Only(BTreeSet<String>),
}

impl AllowList {
    /// The list that allows nothing.
    pub const fn nothing() -> Self {
        Self::Only(BTreeSet::new())
    }

    /// The list that allows exactly `names`.
    pub fn only<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::Only(names.into_iter().map(Into::into).collect())
    }

    /// Whether `name` is allowed.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(names) => names.contains(name),
        }
    }
}

impl Default for AllowList {
    /// Nothing is allowed until the admin says so.
    fn default() -> Self {
        Self::nothing()
    }
}

impl fmt::Display for AllowList {
    /// `any`, `none`, or the names separated by `, ` (the form [`FromStr`] reads back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::Only(names) if names.is_empty() => f.write_str("none"),
            Self::Only(names) => {
                for (i, name) in names.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(name)?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for AllowList {
    type Err = ValidationError;

    /// Reads `any` (or `*`), `none` (or the empty string), or a comma-separated list of names,
    /// each a valid name (`[A-Za-z0-9._-]`, see [`validate_name`]). Because of the keywords, a
    /// workflow or dataset literally called `any` or `none` can only be allowed together with
    /// another name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "any" | "*" => return Ok(Self::Any),
            "none" | "" => return Ok(Self::nothing()),
            _ => {}
        }
        let mut names = BTreeSet::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            validate_name("allow-list entry", name)?;
            names.insert(name.to_owned());
        }
        Ok(Self::Only(names))
    }
}

/// Whether a job from a registered instance runs as soon as it arrives, or waits for a local
/// approval. Kaapana's `automatic_workflow_execution`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Execution {
    /// Allowed jobs start without asking anyone.
    Automatic,
    /// Allowed jobs wait in `pending` until an admin of this instance approves them.
    #[default]
    Approval,
}

impl fmt::Display for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Automatic => "automatic",
            Self::Approval => "approval",
        })
    }
}

/// What one registered instance may ask this instance to do.
///
/// The [`Default`] allows nothing: no workflow, no dataset, approval required, logs kept here.
/// A newly registered peer can do nothing until the admin allows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Workflows (Kaapana's `allowed_dags`) the instance may run here.
    pub allowed_workflows: AllowList,
    /// Datasets (Kaapana's `allowed_datasets`) the instance's jobs may read here.
    pub allowed_datasets: AllowList,
    /// Whether its allowed jobs start at once or wait for a local approval.
    pub execution: Execution,
    /// Whether job logs are sent back to the instance (otherwise only the outcome is).
    pub share_logs: bool,
}

impl Policy {
    /// The policy an instance applies to the jobs of its own workflows that run at itself
    /// (typically the aggregation step): everything allowed, run at once, logs kept.
    pub fn own() -> Self {
        Self {
            allowed_workflows: AllowList::Any,
            allowed_datasets: AllowList::Any,
            execution: Execution::Automatic,
            share_logs: true,
        }
    }

    /// Allows `workflow` for the instance called `instance_name`, or says which rule forbids it.
    pub fn check_workflow(&self, instance_name: &str, workflow: &str) -> Result<(), Denial> {
        check(&self.allowed_workflows, "workflow", workflow, instance_name)
    }

    /// Allows the Airflow DAG `dag_id` for the instance called `instance_name` (DAG ids are
    /// workflows of the runner's own Airflow, allowed by name in `allowed_workflows`), or says
    /// which rule forbids it.
    pub fn check_dag(&self, instance_name: &str, dag_id: &str) -> Result<(), Denial> {
        check(&self.allowed_workflows, "Airflow DAG", dag_id, instance_name)
    }

    /// Allows `dataset` for the instance called `instance_name`, or says which rule forbids it.
    pub fn check_dataset(&self, instance_name: &str, dataset: &str) -> Result<(), Denial> {
        check(&self.allowed_datasets, "dataset", dataset, instance_name)
    }
}

fn check(list: &AllowList, kind: &str, name: &str, instance_name: &str) -> Result<(), Denial> {
    if list.allows(name) {
        Ok(())
    } else {
        Err(Denial { rule: format!("{kind} {name} is not allowed for instance {instance_name}") })
    }
}

/// A request refused by a [`Policy`]. Its message is the rule that refused it, e.g.
/// `dataset lung-ct is not allowed for instance site-a`, fit to show to both admins.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{rule}")]
pub struct Denial {
    /// The rule, in words.
    pub rule: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_allows_nothing() {
        let p = Policy::default();
        assert_eq!(p.execution, Execution::Approval);
        assert!(!p.share_logs);
        assert_eq!(
            p.check_dataset("site-a", "lung-ct").unwrap_err().to_string(),
            "dataset lung-ct is not allowed for instance site-a"
        );
        assert_eq!(
            p.check_workflow("site-a", "totalsegmentator").unwrap_err().to_string(),
            "workflow totalsegmentator is not allowed for instance site-a"
        );
        assert_eq!(
            p.check_dag("site-a", "nnunet-predict").unwrap_err().to_string(),
            "Airflow DAG nnunet-predict is not allowed for instance site-a"
        );
        let dags = Policy { allowed_workflows: AllowList::only(["nnunet-predict"]), ..p };
        assert_eq!(dags.check_dag("site-a", "nnunet-predict"), Ok(()));
    }

    #[test]
    fn allow_lists() {
        let p = Policy {
            allowed_workflows: AllowList::Any,
            allowed_datasets: AllowList::only(["lung-ct", "brain-mr"]),
            ..Policy::default()
        };
        assert_eq!(p.check_workflow("site-a", "anything"), Ok(()));
        assert_eq!(p.check_dataset("site-a", "brain-mr"), Ok(()));
        assert!(p.check_dataset("site-a", "liver-ct").is_err());
        assert!(!AllowList::nothing().allows(""));
    }

    #[test]
    fn allow_list_text_round_trips() {
        for (text, list) in [
            ("any", AllowList::Any),
            ("none", AllowList::nothing()),
            ("brain-mr, lung-ct", AllowList::only(["lung-ct", "brain-mr"])),
        ] {
            assert_eq!(list.to_string(), text);
            assert_eq!(text.parse::<AllowList>().unwrap(), list);
        }
        assert_eq!("*".parse::<AllowList>().unwrap(), AllowList::Any);
        assert_eq!("".parse::<AllowList>().unwrap(), AllowList::nothing());
        assert_eq!("a,b,".parse::<AllowList>().unwrap(), AllowList::only(["a", "b"]));
        assert!("../etc".parse::<AllowList>().is_err());
    }
}
