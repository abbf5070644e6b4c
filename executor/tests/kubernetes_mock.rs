//! The Kubernetes executor's create/watch/delete flow against a **mock** API server: no
//! Kubernetes API server can run on these machines, so kube's `Client` talks to a
//! `tower_test` mock service whose requests a fake cluster task answers. The fake keeps the
//! objects it was given (Job, NetworkPolicy, the Job's pod), answers like the API server
//! (JSON objects and lists, `Status` errors, newline-delimited watch events on held-open
//! streams, plain-text logs), moves the Job through `active` → its final condition when the
//! pod's log has been read (the container has ended), and records every request. Each test
//! asserts the requests: method, path, the bodies' image digest, sandbox and deny-all policy,
//! the propagation policy of deletes, and their order.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::channel::mpsc;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use kaapana_executor::kubernetes::{
    DataVolume, KubernetesConfig, KubernetesExecutor, VolumeSource, job_name,
};
use kaapana_executor::{ExecError, Executor, JobRun, read_exit_record};
use kaapana_protocol::{ExecutorKind, ExitStatus, ImageDigest, JobId, ResourceLimits, Timestamp};
use serde_json::{Value, json};
use tokio::sync::oneshot;

type Body = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<Body>>;

const NS: &str = "kaapana-jobs";
const STARTED: &str = "2026-05-01T10:00:00Z";
const FINISHED: &str = "2026-05-01T10:00:07Z";
const LOG: &str = "reading /input\nwrote /output/stats.json\n";

/// How the fake cluster lets the job end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The container exits 0: the Job is `Complete`.
    Complete,
    /// The container exits with this code: the Job is `Failed` (`BackoffLimitExceeded`).
    Exit(i32),
    /// The container is OOM-killed: `Failed`, container reason `OOMKilled`, exit 137.
    Oom,
    /// The Job runs past `activeDeadlineSeconds`: `Failed` (`DeadlineExceeded`), and the Job
    /// controller deletes the pod.
    Deadline,
    /// The job runs until its Job is deleted.
    Hold,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Option<Value>,
}

impl Seen {
    fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
    fn watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true")
    }
}

struct Fake {
    job_id: JobId,
    ending: Ending,
    version: u64,
    job: Option<Value>,
    policy: Option<Value>,
    pod_visible: bool,
    finished: bool,
    /// Answer a Job create with 403.
    forbid_job_create: bool,
    job_watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    pod_watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    log_streams: Vec<mpsc::UnboundedSender<Bytes>>,
    log_served: Option<oneshot::Sender<()>>,
    seen: Vec<Seen>,
    problems: Vec<String>,
}

enum Reply {
    Json(u16, Value),
    Text(String),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

fn status(code: u16, reason: &str, message: String) -> Reply {
    Reply::Json(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn labels(job: &JobId) -> Value {
    json!({"app.kubernetes.io/managed-by": "kaapana-node", "kaapana.io/job-id": job.to_string()})
}

impl Fake {
    fn new(job_id: JobId, ending: Ending) -> Self {
        Self {
            job_id,
            ending,
            version: 100,
            job: None,
            policy: None,
            pod_visible: false,
            finished: false,
            forbid_job_create: false,
            job_watchers: Vec::new(),
            pod_watchers: Vec::new(),
            log_streams: Vec::new(),
            log_served: None,
            seen: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn name(&self) -> String {
        job_name(&self.job_id)
    }

    fn pod_name(&self) -> String {
        format!("{}-x7k2p", self.name())
    }

    fn bump(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    /// Stores `job` as the API server would after a create.
    fn store_job(&mut self, mut job: Value) {
        let rv = self.bump();
        job["metadata"]["resourceVersion"] = json!(rv);
        job["metadata"]["uid"] = json!("2c7e2f9a-0000-4000-8000-000000000001");
        job["metadata"]["creationTimestamp"] = json!(STARTED);
        job["status"] = json!({"active": 1, "startTime": STARTED, "ready": 0, "terminating": 0});
        self.job = Some(job);
        self.pod_visible = true;
    }

    /// A Job that an earlier process created (for re-attach tests).
    fn seed_job(&mut self, labels: Value) {
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": self.name(), "namespace": NS, "labels": labels},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "job", "image": "x"}]}}},
        });
        self.store_job(job);
        self.policy = Some(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": self.name(), "namespace": NS, "labels": labels}}));
    }

    fn final_status(&self) -> Value {
        let failed = |reason: &str, message: &str| {
            json!({"failed": 1, "startTime": STARTED, "ready": 0, "terminating": 0, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
                 "lastProbeTime": FINISHED, "lastTransitionTime": FINISHED},
                {"type": "Failed", "status": "True", "reason": reason, "message": message,
                 "lastProbeTime": FINISHED, "lastTransitionTime": FINISHED}]})
        };
        match self.ending {
            Ending::Complete => json!({
                "succeeded": 1, "startTime": STARTED, "completionTime": FINISHED, "ready": 0,
                "terminating": 0, "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                     "lastProbeTime": FINISHED, "lastTransitionTime": FINISHED},
                    {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                     "lastProbeTime": FINISHED, "lastTransitionTime": FINISHED}]}),
            Ending::Exit(_) | Ending::Oom => {
                failed("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            }
            Ending::Deadline => {
                failed("DeadlineExceeded", "Job was active longer than specified deadline")
            }
            Ending::Hold => json!({"active": 1, "startTime": STARTED}),
        }
    }

    fn pod(&self) -> Value {
        let terminated = |code: i32, reason: &str| {
            json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": STARTED,
                   "finishedAt": FINISHED, "containerID": "containerd://0123"}})
        };
        let (phase, state) = match self.ending {
            Ending::Complete => ("Succeeded", terminated(0, "Completed")),
            Ending::Exit(c) => ("Failed", terminated(c, "Error")),
            Ending::Oom => ("Failed", terminated(137, "OOMKilled")),
            Ending::Deadline | Ending::Hold => {
                ("Running", json!({"running": {"startedAt": STARTED}}))
            }
        };
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.pod_name(), "namespace": NS, "labels": labels(&self.job_id),
                         "resourceVersion": self.version.to_string(),
                         "creationTimestamp": STARTED},
            "spec": {"containers": [{"name": "job", "image": "x"}], "restartPolicy": "Never"},
            "status": {"phase": phase, "containerStatuses": [{"name": "job", "image": "x",
                "imageID": "x", "ready": false, "restartCount": 0, "state": state}]},
        })
    }

    /// The container has ended (its log was read): the Job gets its final condition.
    fn finish(&mut self) {
        if self.finished || self.ending == Ending::Hold {
            return;
        }
        self.finished = true;
        let rv = self.bump();
        let status = self.final_status();
        if let Some(job) = &mut self.job {
            job["status"] = status;
            job["metadata"]["resourceVersion"] = json!(rv);
            let ev = event("MODIFIED", job);
            self.job_watchers.retain(|w| w.unbounded_send(ev.clone()).is_ok());
        }
        if self.ending == Ending::Deadline {
            // The Job controller deletes the pods of a Job past its deadline.
            self.pod_visible = false;
        }
    }

    fn check_job_body(&mut self, body: &Value, image: &str) {
        let c = &body["spec"]["template"]["spec"]["containers"][0];
        let checks = [
            ("image", c["image"] == json!(image)),
            ("labels", body["metadata"]["labels"] == labels(&self.job_id)),
            ("pod labels", body["spec"]["template"]["metadata"]["labels"] == labels(&self.job_id)),
            ("backoffLimit", body["spec"]["backoffLimit"] == json!(0)),
            ("no ttl", body["spec"].get("ttlSecondsAfterFinished").is_none()),
            ("deadline", body["spec"]["activeDeadlineSeconds"] == json!(600)),
            (
                "no token",
                body["spec"]["template"]["spec"]["automountServiceAccountToken"] == json!(false),
            ),
            (
                "no privilege escalation",
                c["securityContext"]["allowPrivilegeEscalation"] == json!(false),
            ),
            ("read-only rootfs", c["securityContext"]["readOnlyRootFilesystem"] == json!(true)),
            ("memory", c["resources"]["limits"]["memory"] == json!("268435456")),
        ];
        for (what, ok) in checks {
            if !ok {
                self.problems.push(format!("Job body: {what} is wrong: {body}"));
            }
        }
        let sub = |mount: &str| {
            c["volumeMounts"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["mountPath"] == json!(mount)))
                .map(|m| (m["subPath"].clone(), m["readOnly"].clone()))
        };
        let jobs = format!("jobs/{}", self.job_id);
        if sub("/output") != Some((json!(format!("{jobs}/output")), json!(false)))
            || sub("/input") != Some((json!(format!("{jobs}/input")), json!(true)))
        {
            self.problems.push(format!("Job body: data mounts are wrong: {}", c["volumeMounts"]));
        }
    }

    fn check_policy_body(&mut self, body: &Value) {
        let spec = &body["spec"];
        if spec["policyTypes"] != json!(["Ingress", "Egress"])
            || spec.get("ingress").is_some()
            || spec.get("egress").is_some()
            || spec["podSelector"]["matchLabels"] != labels(&self.job_id)
        {
            self.problems.push(format!("NetworkPolicy is not deny-all for the job's pods: {body}"));
        }
    }

    fn handle(&mut self, req: &Seen, image: &str) -> Reply {
        let name = self.name();
        let jobs = format!("/apis/batch/v1/namespaces/{NS}/jobs");
        let job_path = format!("{jobs}/{name}");
        let policies = format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies");
        let policy_path = format!("{policies}/{name}");
        let pods = format!("/api/v1/namespaces/{NS}/pods");
        let log_path = format!("{pods}/{}/log", self.pod_name());
        let not_found =
            |what: &str| status(404, "NotFound", format!("{what} \"{name}\" not found"));

        if req.is("POST", &policies) {
            let body = req.body.clone().unwrap_or_default();
            self.check_policy_body(&body);
            if self.policy.is_some() {
                return status(
                    409,
                    "AlreadyExists",
                    format!("networkpolicies \"{name}\" already exists"),
                );
            }
            let mut stored = body;
            stored["metadata"]["resourceVersion"] = json!(self.bump());
            self.policy = Some(stored.clone());
            return Reply::Json(201, stored);
        }
        if req.is("DELETE", &policy_path) {
            return match self.policy.take() {
                Some(_) => Reply::Json(
                    200,
                    json!({"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Success", "details": {"name": name}}),
                ),
                None => not_found("networkpolicies.networking.k8s.io"),
            };
        }
        if req.is("POST", &jobs) {
            let body = req.body.clone().unwrap_or_default();
            self.check_job_body(&body, image);
            if self.forbid_job_create {
                return status(
                    403,
                    "Forbidden",
                    format!(
                        "jobs.batch is forbidden: User \"system:serviceaccount:{NS}:kaapana-node\" \
                     cannot create resource \"jobs\" in API group \"batch\" in the namespace \"{NS}\""
                    ),
                );
            }
            if self.job.is_some() {
                return status(
                    409,
                    "AlreadyExists",
                    format!("jobs.batch \"{name}\" already exists"),
                );
            }
            self.store_job(body);
            return Reply::Json(201, self.job.clone().unwrap());
        }
        if req.is("GET", &job_path) {
            return match &self.job {
                Some(j) => Reply::Json(200, j.clone()),
                None => not_found("jobs.batch"),
            };
        }
        if req.is("GET", &jobs) && req.watch() {
            if req.query.get("fieldSelector") != Some(&format!("metadata.name={name}")) {
                self.problems.push(format!("Job watch without the name's field selector: {req:?}"));
            }
            let (tx, rx) = mpsc::unbounded();
            match &self.job {
                Some(j) if j["metadata"].get("deletionTimestamp").is_some() => {
                    let _ = tx.unbounded_send(event("DELETED", j));
                    self.job = None;
                    return Reply::Stream(rx);
                }
                Some(j) if self.finished => {
                    let _ = tx.unbounded_send(event("MODIFIED", j));
                }
                Some(_) => {}
                None => {
                    // Gone since the client's get: end the stream empty.
                    return Reply::Stream(rx);
                }
            }
            self.job_watchers.push(tx);
            return Reply::Stream(rx);
        }
        if req.is("GET", &jobs) {
            if req.query.get("labelSelector").map(String::as_str)
                != Some("app.kubernetes.io/managed-by=kaapana-node")
            {
                self.problems.push(format!("Job list without the managed-by selector: {req:?}"));
            }
            let items: Vec<Value> = self.job.iter().cloned().collect();
            return Reply::Json(
                200,
                json!({"kind": "JobList", "apiVersion": "batch/v1",
                "metadata": {"resourceVersion": self.version.to_string()}, "items": items}),
            );
        }
        if req.is("DELETE", &job_path) {
            let body = req.body.clone().unwrap_or_default();
            if body["propagationPolicy"] != json!("Foreground") {
                self.problems.push(format!("Job deleted without foreground propagation: {body}"));
            }
            let Some(job) = &mut self.job else { return not_found("jobs.batch") };
            if job["metadata"].get("deletionTimestamp").is_none() {
                job["metadata"]["deletionTimestamp"] = json!(FINISHED);
                job["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
                self.version += 1;
                job["metadata"]["resourceVersion"] = json!(self.version.to_string());
            }
            let job = job.clone();
            // Foreground deletion: the pods go first, the Job stays (marked) until they are
            // gone; the fake lets it go when it is next watched.
            self.pod_visible = false;
            self.log_streams.clear();
            let marked = event("MODIFIED", &job);
            self.job_watchers.retain(|w| w.unbounded_send(marked.clone()).is_ok());
            return Reply::Json(200, job);
        }
        if req.is("GET", &pods) {
            if req.query.get("labelSelector") != Some(&format!("kaapana.io/job-id={}", self.job_id))
            {
                self.problems.push(format!("pods asked without the job's label selector: {req:?}"));
            }
            let items: Vec<Value> = if self.pod_visible { vec![self.pod()] } else { Vec::new() };
            if req.watch() {
                let (tx, rx) = mpsc::unbounded();
                for p in &items {
                    let _ = tx.unbounded_send(event("ADDED", p));
                }
                self.pod_watchers.push(tx);
                return Reply::Stream(rx);
            }
            return Reply::Json(
                200,
                json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": self.version.to_string()}, "items": items}),
            );
        }
        if req.is("GET", &log_path) {
            if req.query.get("container").map(String::as_str) != Some("job") {
                self.problems.push(format!("log asked without the container: {req:?}"));
            }
            if !self.pod_visible {
                return status(404, "NotFound", format!("pods \"{}\" not found", self.pod_name()));
            }
            if let Some(tx) = self.log_served.take() {
                let _ = tx.send(());
            }
            if self.ending == Ending::Hold && req.query.get("follow").is_some_and(|f| f == "true") {
                let (tx, rx) = mpsc::unbounded();
                let _ = tx.unbounded_send(Bytes::from_static(LOG.as_bytes()));
                self.log_streams.push(tx);
                return Reply::Stream(rx);
            }
            self.finish();
            return Reply::Text(LOG.into());
        }
        self.problems
            .push(format!("unexpected request {} {} {:?}", req.method, req.path, req.query));
        status(500, "InternalError", "the fake does not know this request".into())
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

async fn parse(req: http::Request<kube::client::Body>) -> Seen {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap());
    Seen { method, path, query, body }
}

fn respond(reply: Reply) -> http::Response<Body> {
    let (code, ctype, body): (u16, &str, Body) = match reply {
        Reply::Json(code, v) => {
            (code, "application/json", Full::new(Bytes::from(v.to_string())).boxed_unsync())
        }
        Reply::Text(t) => (200, "text/plain", Full::new(Bytes::from(t)).boxed_unsync()),
        Reply::Stream(rx) => (
            200,
            "application/json",
            StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b)))).boxed_unsync(),
        ),
    };
    http::Response::builder().status(code).header("content-type", ctype).body(body).unwrap()
}

/// The fake cluster: answers every request of the mock service until the client is gone.
fn serve(mut handle: Handle, fake: Arc<Mutex<Fake>>, image: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let seen = parse(req).await;
            let reply = {
                let mut f = fake.lock().unwrap();
                f.seen.push(seen.clone());
                f.handle(&seen, &image)
            };
            send.send_response(respond(reply));
        }
    })
}

struct Site {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    job: JobRun,
    fake: Arc<Mutex<Fake>>,
    executor: Arc<KubernetesExecutor>,
    _server: tokio::task::JoinHandle<()>,
}

fn digest() -> ImageDigest {
    ImageDigest::parse(&format!("sha256:{}", "c0de".repeat(16))).unwrap()
}

fn config(data: &Path) -> KubernetesConfig {
    KubernetesConfig {
        namespace: NS.into(),
        image_repository: "registry.example.org/kaapana/jobs".into(),
        volumes: vec![DataVolume {
            local_path: data.to_owned(),
            source: VolumeSource::PersistentVolumeClaim {
                claim_name: "kaapana-node-data".into(),
                sub_path: String::new(),
            },
        }],
        ..KubernetesConfig::default()
    }
}

fn site(ending: Ending, setup: impl FnOnce(&mut Fake)) -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().canonicalize().unwrap();
    let id = JobId::from_bytes([0x3c; 16]);
    let dir = data.join("jobs").join(id.to_string());
    for sub in ["input", "output"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let job = JobRun {
        job_id: id,
        work: kaapana_executor::JobWork::Container {
            image: digest(),
            command: vec!["/bin/kaapana-stats".into()],
            env: vec![("SITE".into(), "a".into())],
        },
        input: Some(dir.join("input")),
        upstream: Vec::new(),
        output: dir.join("output"),
        log: dir.join("job.log"),
        limits: ResourceLimits { cpu_millis: 500, memory_bytes: 256 << 20, gpus: 0 },
        timeout: Duration::from_secs(600),
    };
    let mut fake = Fake::new(id, ending);
    setup(&mut fake);
    let fake = Arc::new(Mutex::new(fake));
    let (svc, handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<Body>>();
    let server =
        serve(handle, Arc::clone(&fake), format!("registry.example.org/kaapana/jobs@{}", digest()));
    let client = kube::Client::new(svc, "default");
    let executor = Arc::new(KubernetesExecutor::new(client, config(&data)).unwrap());
    Site { _tmp: tmp, data, job, fake, executor, _server: server }
}

impl Site {
    fn seen(&self) -> Vec<Seen> {
        self.fake.lock().unwrap().seen.clone()
    }
    fn assert_no_problems(&self) {
        let f = self.fake.lock().unwrap();
        assert!(
            f.problems.is_empty(),
            "the fake API server saw problems:\n{}",
            f.problems.join("\n")
        );
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.job.log).unwrap_or_default()
    }
    fn index(&self, method: &str, path: &str) -> Vec<usize> {
        self.seen().iter().enumerate().filter(|(_, s)| s.is(method, path)).map(|(i, _)| i).collect()
    }
    fn jobs_path(&self) -> String {
        format!("/apis/batch/v1/namespaces/{NS}/jobs")
    }
    fn policies_path(&self) -> String {
        format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies")
    }
    /// The NetworkPolicy was created before the Job, the Job deleted (foreground) before the
    /// NetworkPolicy, and nothing of the job is left.
    fn assert_created_and_cleaned_up(&self) {
        let name = job_name(&self.job.job_id);
        let np_create = self.index("POST", &self.policies_path());
        let job_create = self.index("POST", &self.jobs_path());
        assert_eq!(np_create.len(), 1, "{:#?}", self.seen());
        assert_eq!(job_create.len(), 1, "{:#?}", self.seen());
        assert!(np_create[0] < job_create[0], "the NetworkPolicy must come first");
        self.assert_cleaned_up(&name);
    }
    fn assert_cleaned_up(&self, name: &str) {
        let job_delete = self.index("DELETE", &format!("{}/{name}", self.jobs_path()));
        let np_delete = self.index("DELETE", &format!("{}/{name}", self.policies_path()));
        assert!(!job_delete.is_empty() && !np_delete.is_empty(), "{:#?}", self.seen());
        assert!(
            job_delete.iter().max() < np_delete.iter().min(),
            "the NetworkPolicy must outlive the Job's pods"
        );
        let f = self.fake.lock().unwrap();
        assert!(f.job.is_none() && f.policy.is_none(), "objects left behind");
    }
}

fn ts(rfc3339: &str) -> Timestamp {
    let t: k8s_openapi::jiff::Timestamp = rfc3339.parse().unwrap();
    Timestamp::from_millis(u64::try_from(t.as_millisecond()).unwrap())
}

#[tokio::test]
async fn mock_job_runs_to_completion_with_its_log_and_is_cleaned_up() {
    let site = site(Ending::Complete, |_| {});
    let outcome = site.executor.run(site.job.clone()).await.unwrap();
    assert_eq!(outcome.exit, ExitStatus::Exited(0));
    assert_eq!(outcome.started_at, ts(STARTED));
    assert_eq!(outcome.finished_at, ts(FINISHED));
    assert_eq!(site.log(), LOG, "the pod's log, exactly once");
    assert_eq!(read_exit_record(&site.job.log), Some(outcome));
    site.assert_no_problems();
    site.assert_created_and_cleaned_up();
    // The log was followed, not fetched afterwards.
    let logs: Vec<Seen> = site.seen().into_iter().filter(|s| s.path.ends_with("/log")).collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0].query.get("follow").map(String::as_str), Some("true"));
}

#[tokio::test]
async fn mock_failed_job_reports_its_exit_code() {
    let site = site(Ending::Exit(3), |_| {});
    let outcome = site.executor.run(site.job.clone()).await.unwrap();
    assert_eq!(outcome.exit, ExitStatus::Exited(3));
    assert!(site.log().starts_with(LOG));
    site.assert_no_problems();
    site.assert_created_and_cleaned_up();
}

#[tokio::test]
async fn mock_deadline_exceeded_is_timed_out() {
    let site = site(Ending::Deadline, |_| {});
    let outcome = site.executor.run(site.job.clone()).await.unwrap();
    assert_eq!(outcome.exit, ExitStatus::TimedOut);
    let log = site.log();
    assert!(log.starts_with(LOG), "{log}");
    assert!(log.contains("killed after its timeout of 600s"), "{log}");
    site.assert_no_problems();
    site.assert_created_and_cleaned_up();
}

#[tokio::test]
async fn mock_oom_killed_container_is_out_of_memory() {
    let site = site(Ending::Oom, |_| {});
    let outcome = site.executor.run(site.job.clone()).await.unwrap();
    assert_eq!(outcome.exit, ExitStatus::OutOfMemory);
    assert!(site.log().contains("exceeded its memory limit"));
    site.assert_no_problems();
    site.assert_created_and_cleaned_up();
}

#[tokio::test]
async fn mock_kill_deletes_the_job_and_run_returns_killed() {
    let (served_tx, served_rx) = oneshot::channel();
    let site = site(Ending::Hold, |f| f.log_served = Some(served_tx));
    let executor = Arc::clone(&site.executor);
    let job = site.job.clone();
    let run = tokio::spawn(async move { executor.run(job).await });
    // The job runs (its log is being followed); then abort it.
    served_rx.await.unwrap();
    site.executor.kill(&site.job.job_id).await.unwrap();
    let outcome = run.await.unwrap().unwrap();
    assert_eq!(outcome.exit, ExitStatus::Killed(9));
    let log = site.log();
    assert!(log.starts_with(LOG) && log.contains("the job was aborted"), "{log}");
    assert!(!log.contains("outside kaapana-node"), "the executor knows it killed it: {log}");
    site.assert_no_problems();
    site.assert_created_and_cleaned_up();
    // Killing a job that is gone says so.
    let e = site.executor.kill(&site.job.job_id).await.unwrap_err();
    assert!(matches!(e, ExecError::JobNotFound { .. }), "{e}");
}

#[tokio::test]
async fn mock_existing_job_is_reattached_after_409_never_duplicated() {
    let site = site(Ending::Complete, |f| f.seed_job(labels(&JobId::from_bytes([0x3c; 16]))));
    let outcome = site.executor.run(site.job.clone()).await.unwrap();
    assert_eq!(outcome.exit, ExitStatus::Exited(0));
    let log = site.log();
    assert!(log.contains("already exists (an earlier attempt): following it"), "{log}");
    assert!(log.ends_with(LOG), "{log}");
    site.assert_no_problems();
    // One create each (both answered 409), no second Job.
    site.assert_created_and_cleaned_up();
}

#[tokio::test]
async fn mock_foreign_job_of_the_same_name_is_left_alone() {
    let site = site(Ending::Complete, |f| {
        f.seed_job(json!({"app.kubernetes.io/managed-by": "someone-else"}));
    });
    let e = site.executor.run(site.job.clone()).await.unwrap_err();
    assert!(matches!(e, ExecError::BadJob { .. }), "{e}");
    assert!(e.to_string().contains("is not kaapana-node's Job"), "{e}");
    let name = job_name(&site.job.job_id);
    assert!(site.index("DELETE", &format!("{}/{name}", site.jobs_path())).is_empty());
    assert!(site.fake.lock().unwrap().job.is_some());
}

#[tokio::test]
async fn mock_restart_finds_the_job_with_running_and_reattaches() {
    let id = JobId::from_bytes([0x3c; 16]);
    let site = site(Ending::Complete, |f| f.seed_job(labels(&id)));
    assert_eq!(site.executor.running().await.unwrap(), vec![id]);
    let outcome = site.executor.reattach(&id, &site.job.log).await.unwrap();
    assert_eq!(outcome.exit, ExitStatus::Exited(0));
    let log = site.log();
    assert!(log.contains("re-attached to Job") && log.ends_with(LOG), "{log}");
    site.assert_no_problems();
    site.assert_cleaned_up(&job_name(&id));
    assert!(site.executor.running().await.unwrap().is_empty());
    // Nothing of it remains now.
    let e = site.executor.reattach(&id, &site.job.log).await.unwrap_err();
    assert!(matches!(e, ExecError::JobNotFound { .. }), "{e}");
    assert!(site.log().contains("the job's Job is gone"));
    // And cleaning up what is gone is fine.
    site.executor.cleanup(&id).await.unwrap();
}

#[tokio::test]
async fn mock_forbidden_create_says_which_permission_is_missing() {
    let site = site(Ending::Complete, |f| f.forbid_job_create = true);
    let e = site.executor.run(site.job.clone()).await.unwrap_err();
    let text = format!("{e} ({:?})", std::error::Error::source(&e).map(ToString::to_string));
    assert!(text.contains("create Job") && text.contains("403"), "{text}");
    assert!(text.contains("permission") && text.contains("networkpolicies"), "{text}");
    // The NetworkPolicy created for it is removed again.
    assert!(site.fake.lock().unwrap().policy.is_none());
}

#[tokio::test]
async fn mock_dataset_with_upstream_without_mount_points_is_refused_before_any_call() {
    let site = site(Ending::Complete, |_| {});
    let up = site.data.join("jobs/up/stats");
    std::fs::create_dir_all(&up).unwrap();
    let job = JobRun { upstream: vec![("stats".into(), up)], ..site.job.clone() };
    let e = site.executor.run(job).await.unwrap_err();
    assert!(e.to_string().contains("no overlay mounts"), "{e}");
    assert!(site.seen().is_empty(), "{:#?}", site.seen());
}

#[tokio::test]
async fn mock_images_are_pulled_by_the_cluster() {
    let site = site(Ending::Complete, |_| {});
    assert_eq!(site.executor.kind(), ExecutorKind::Kubernetes);
    assert!(site.executor.has_image(&digest()).await.unwrap());
    let e = site.executor.pull("registry.example.org/other", &digest(), false).await.unwrap_err();
    assert!(e.to_string().contains("does not pull images"), "{e}");
    assert!(site.seen().is_empty());
}
