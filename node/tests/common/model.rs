//! An owner daemon on a real containerd whose first job makes a "model", and a training job
//! reading it dispatched to "runner", an in-process peer that takes the manifest and never
//! runs it: what the input-fetch test and benchmark fetch from.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use kaapana_node::blobs::hash_file;
use kaapana_protocol::{BlobRef, JobId, Sha256Digest};

use super::containerd::TestContainerd;
use super::{Daemon, Site, TestPeer, federation};

/// The sites, the owner's daemon, the runner peer, and what it may fetch.
pub struct ModelOwner {
    /// The owner's daemon (dropped first).
    pub daemon: Daemon,
    /// The runner as an in-process peer connected to the owner.
    pub runner: TestPeer,
    /// Other sites of the federation (registered everywhere, not running).
    pub others: Vec<Site>,
    /// The owner site.
    pub owner: Site,
    /// The training job dispatched to the runner.
    pub train: JobId,
    /// The model's bundle, as the job's manifest names it.
    pub model: BlobRef,
    /// The containerd the owner's job ran on.
    pub ctd: TestContainerd,
    _rt: tokio::runtime::Runtime,
}

/// Sites `owner`, `runner` and `others` under `root`; the owner's model job runs `command`
/// (which writes `/output/...`) and the training job at `runner` reads it.
pub fn owner_with_model(root: &Path, others: &[&str], command: &str, wait: Duration) -> ModelOwner {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let mut names = vec!["owner", "runner"];
    names.extend_from_slice(others);
    let mut sites = federation(root, &names).into_iter();
    let (owner, runner) = (sites.next().unwrap(), sites.next().unwrap());
    owner.set_executor(Some(ctd.containerd().socket()));
    let image = super::containerd::build_busybox_image(root, "busybox", false);
    owner.ok(&["image", "import", image.tar.to_str().unwrap()]);
    let daemon = owner.start();
    let peer = TestPeer::new(&runner);
    peer.allow(&owner);
    peer.connect(&owner, wait);
    let w = daemon.submit_workflow(&format!(
        r#"name = "round"
[[job]]
name = "model"
runner = "owner"
image = "{digest}"
command = ["sh", "-c", "{command}"]
timeout = "10m"
[[job]]
name = "train"
runner = "runner"
inputs = ["model"]
image = "{digest}"
"#,
        digest = image.digest
    ));
    let id = w.workflow_id.clone();
    daemon.wait_until("the model and the training job's dispatch", wait, |d| {
        d.workflow(&id).jobs[1].state != "waiting"
    });
    let view = daemon.workflow(&id);
    let train: JobId = view.jobs[1].job_id.parse().unwrap();
    let digest: Sha256Digest = view.jobs[0].result.as_deref().unwrap().parse().unwrap();
    let model = hash_file(&owner.dir.join("blobs/sha256").join(digest.hex())).unwrap();
    assert_eq!(model.digest, digest);
    ModelOwner { daemon, runner: peer, others: sites.collect(), owner, train, model, ctd, _rt: rt }
}

impl ModelOwner {
    /// The id of the model's workflow.
    pub fn workflow_id(&self) -> String {
        let w: Vec<kaapana_node::api::WorkflowView> =
            self.daemon.api().get("/v1/workflows").unwrap();
        w[0].workflow_id.clone()
    }

    /// The model's bytes at the owner.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.owner.dir.join("blobs/sha256").join(self.model.digest.hex())).unwrap()
    }
}
