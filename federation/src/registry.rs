//! The instances this one has registered, each with its [`Policy`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use kaapana_protocol::{InstanceId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// An instance registered here by certificate exchange, and what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredInstance {
    /// Its identity (the libp2p `PeerId` of its key).
    pub instance_id: InstanceId,
    /// Its display name (the certificate's CN), unique within the registry.
    pub name: String,
    /// Its instance certificate, DER.
    pub certificate_der: Vec<u8>,
    /// SHA-256 of `certificate_der`: what the admins compare by phone.
    pub fingerprint: [u8; 32],
    /// Where it listens (multiaddrs, as given in its export bundle).
    pub listen_addrs: Vec<String>,
    /// End of the certificate's validity.
    pub certificate_not_after: Timestamp,
    /// When it was registered here.
    pub registered_at: Timestamp,
    /// What it may do here.
    pub policy: Policy,
}

/// How a user names an instance: by id or by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum InstanceRef {
    /// By instance id.
    Id(InstanceId),
    /// By display name.
    Name(String),
}

impl FromStr for InstanceRef {
    type Err = Infallible;

    /// An instance id if `s` parses as one, otherwise a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<InstanceId>() {
            Ok(id) => Self::Id(id),
            Err(_) => Self::Name(s.to_owned()),
        })
    }
}

impl From<InstanceId> for InstanceRef {
    fn from(id: InstanceId) -> Self {
        Self::Id(id)
    }
}

impl fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => fmt::Display::fmt(id, f),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// Why a registry change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The instance id is registered already.
    #[error(
        "instance {name} is already registered ({id}); remove it first with `kaapana-node instance remove {name}`"
    )]
    AlreadyRegistered {
        /// The name it is registered under.
        name: String,
        /// Its id.
        id: InstanceId,
    },
    /// Another instance is registered under this name.
    #[error(
        "the name {name} is already taken by instance {by}; remove that instance first with `kaapana-node instance remove {by}`"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// The instance that has it.
        by: InstanceId,
    },
    /// No registered instance matches.
    #[error(
        "no registered instance is called or has the id {what}; `kaapana-node instance list` shows the registered instances"
    )]
    NotFound {
        /// The id or name that was looked for.
        what: String,
    },
}

/// The registered instances, by id, with a unique-name index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registry {
    by_id: BTreeMap<InstanceId, RegisteredInstance>,
    by_name: BTreeMap<String, InstanceId>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `inst`. Refused if its id is registered already or another instance has its
    /// name.
    pub fn add(&mut self, inst: RegisteredInstance) -> Result<(), RegistryError> {
        if let Some(existing) = self.by_id.get(&inst.instance_id) {
            return Err(RegistryError::AlreadyRegistered {
                name: existing.name.clone(),
                id: existing.instance_id,
            });
        }
        if let Some(by) = self.by_name.get(&inst.name) {
            return Err(RegistryError::NameTaken { name: inst.name, by: *by });
        }
        self.by_name.insert(inst.name.clone(), inst.instance_id);
        self.by_id.insert(inst.instance_id, inst);
        Ok(())
    }

    /// Replaces the policy of the instance `r` names.
    pub fn update_policy(&mut self, r: &InstanceRef, policy: Policy) -> Result<(), RegistryError> {
        let id = self.resolve_id(r)?;
        match self.by_id.get_mut(&id) {
            Some(inst) => {
                inst.policy = policy;
                Ok(())
            }
            None => Err(not_found(r)),
        }
    }

    /// Removes the instance `r` names and returns it.
    pub fn remove(&mut self, r: &InstanceRef) -> Result<RegisteredInstance, RegistryError> {
        let id = self.resolve_id(r)?;
        let inst = self.by_id.remove(&id).ok_or_else(|| not_found(r))?;
        self.by_name.remove(&inst.name);
        Ok(inst)
    }

    /// The instance with this id.
    pub fn get(&self, id: &InstanceId) -> Option<&RegisteredInstance> {
        self.by_id.get(id)
    }

    /// The instance `r` names.
    pub fn resolve(&self, r: &InstanceRef) -> Option<&RegisteredInstance> {
        match r {
            InstanceRef::Id(id) => self.by_id.get(id),
            InstanceRef::Name(name) => self.by_name.get(name).and_then(|id| self.by_id.get(id)),
        }
    }

    /// Whether an instance with this id is registered.
    pub fn is_registered(&self, id: &InstanceId) -> bool {
        self.by_id.contains_key(id)
    }

    /// The registered instances, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &RegisteredInstance> {
        self.by_id.values()
    }

    /// How many instances are registered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no instance is registered.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn resolve_id(&self, r: &InstanceRef) -> Result<InstanceId, RegistryError> {
        self.resolve(r).map(|inst| inst.instance_id).ok_or_else(|| not_found(r))
    }
}

fn not_found(r: &InstanceRef) -> RegistryError {
    RegistryError::NotFound { what: r.to_string() }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::policy::{AllowList, Execution};

    /// A valid instance id (a SHA-256 multihash `PeerId`, as RSA peers have), cheap to make.
    fn id(n: u8) -> InstanceId {
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[n; 32]);
        InstanceId::from_bytes(&bytes).unwrap()
    }

    fn inst(n: u8, name: &str) -> RegisteredInstance {
        RegisteredInstance {
            instance_id: id(n),
            name: name.to_owned(),
            certificate_der: vec![n; 8],
            fingerprint: [n; 32],
            listen_addrs: vec!["/ip4/127.0.0.1/udp/4433/quic-v1".to_owned()],
            certificate_not_after: Timestamp::from_millis(2_000_000_000_000),
            registered_at: Timestamp::from_millis(1_700_000_000_000),
            policy: Policy::default(),
        }
    }

    impl Registry {
        fn assert_consistent(&self) {
            assert_eq!(self.by_id.len(), self.by_name.len());
            for (id, inst) in &self.by_id {
                assert_eq!(*id, inst.instance_id);
                assert_eq!(self.by_name.get(&inst.name), Some(id));
            }
        }
    }

    #[test]
    fn add_refuses_duplicate_ids_and_names() {
        let mut r = Registry::new();
        r.add(inst(1, "site-a")).unwrap();
        r.add(inst(2, "site-b")).unwrap();
        let err = r.add(inst(2, "site-b-again")).unwrap_err();
        assert_eq!(err, RegistryError::AlreadyRegistered { name: "site-b".into(), id: id(2) });
        assert!(
            err.to_string().starts_with("instance site-b is already registered (")
                && err
                    .to_string()
                    .ends_with("; remove it first with `kaapana-node instance remove site-b`"),
            "{err}"
        );
        let err = r.add(inst(3, "site-a")).unwrap_err();
        assert_eq!(err, RegistryError::NameTaken { name: "site-a".into(), by: id(1) });
        assert_eq!(r.len(), 2);
        r.assert_consistent();
    }

    #[test]
    fn resolve_update_remove_by_id_or_name() {
        let mut r = Registry::new();
        r.add(inst(1, "site-a")).unwrap();
        r.add(inst(2, "site-b")).unwrap();
        let by_name: InstanceRef = "site-b".parse().unwrap();
        let by_id: InstanceRef = id(2).to_string().parse().unwrap();
        assert_eq!(by_id, InstanceRef::Id(id(2)));
        assert_eq!(r.resolve(&by_name), r.get(&id(2)));
        assert_eq!(r.resolve(&by_id).map(|i| i.name.as_str()), Some("site-b"));

        let open = Policy {
            allowed_workflows: AllowList::Any,
            allowed_datasets: AllowList::only(["lung-ct"]),
            execution: Execution::Automatic,
            share_logs: true,
        };
        r.update_policy(&by_name, open.clone()).unwrap();
        assert_eq!(r.get(&id(2)).unwrap().policy, open);

        let removed = r.remove(&by_id).unwrap();
        assert_eq!(removed.name, "site-b");
        assert!(!r.is_registered(&id(2)));
        assert!(r.resolve(&by_name).is_none());
        let err = r.remove(&by_name).unwrap_err();
        assert_eq!(err, RegistryError::NotFound { what: "site-b".into() });
        assert!(r.update_policy(&by_id, Policy::default()).is_err());
        // The name is free again.
        r.add(inst(3, "site-b")).unwrap();
        r.assert_consistent();
        assert_eq!(r.iter().count(), 2);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(u8, u8),
        RemoveById(u8),
        RemoveByName(u8),
        UpdatePolicy(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u8..6).prop_map(|(i, n)| Op::Add(i, n)),
            (0u8..6).prop_map(Op::RemoveById),
            (0u8..6).prop_map(Op::RemoveByName),
            (0u8..6).prop_map(Op::UpdatePolicy),
        ]
    }

    proptest! {
        #[test]
        fn name_index_stays_consistent(ops in proptest::collection::vec(op(), 0..64)) {
            let mut r = Registry::new();
            let mut model: BTreeMap<u8, u8> = BTreeMap::new(); // id -> name
            for op in ops {
                match op {
                    Op::Add(i, n) => {
                        let ok = r.add(inst(i, &format!("site-{n}"))).is_ok();
                        let expect = !model.contains_key(&i) && !model.values().any(|&m| m == n);
                        prop_assert_eq!(ok, expect);
                        if ok {
                            model.insert(i, n);
                        }
                    }
                    Op::RemoveById(i) => {
                        let ok = r.remove(&InstanceRef::Id(id(i))).is_ok();
                        prop_assert_eq!(ok, model.remove(&i).is_some());
                    }
                    Op::RemoveByName(n) => {
                        let ok = r.remove(&InstanceRef::Name(format!("site-{n}"))).is_ok();
                        let before = model.len();
                        model.retain(|_, m| *m != n);
                        prop_assert_eq!(ok, model.len() < before);
                    }
                    Op::UpdatePolicy(i) => {
                        let ok = r.update_policy(&InstanceRef::Id(id(i)), Policy::default()).is_ok();
                        prop_assert_eq!(ok, model.contains_key(&i));
                    }
                }
                r.assert_consistent();
                prop_assert_eq!(r.len(), model.len());
                let names: BTreeSet<String> = r.iter().map(|i| i.name.clone()).collect();
                let expected: BTreeSet<String> =
                    model.values().map(|n| format!("site-{n}")).collect();
                prop_assert_eq!(names, expected);
            }
        }
    }
}
