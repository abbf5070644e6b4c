//! [`KubernetesError`]: what went wrong between the executor and the cluster, and what to do
//! about it; and how it becomes an [`ExecError`] for the [`crate::Executor`] trait.

use std::path::PathBuf;

use crate::ExecError;

/// Why the Kubernetes executor could not configure itself, build a job's objects or talk to
/// the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubernetesError {
    /// A setting of [`super::KubernetesConfig`] is invalid.
    #[error("invalid Kubernetes executor configuration: {detail}")]
    Config {
        /// Which setting, and what it must look like.
        detail: String,
    },
    /// A folder of the job is on none of the configured data volumes, so the pod cannot see it.
    #[error(
        "{what} {path} is on no data volume of the Kubernetes executor (their local paths: \
         {volumes}); add a `volumes` entry whose `local_path` contains it"
    )]
    NotOnVolume {
        /// Which folder (`the input`, `the output`, `upstream result "a"`).
        what: String,
        /// The folder.
        path: PathBuf,
        /// The configured `local_path`s.
        volumes: String,
    },
    /// The job cannot be run as given.
    #[error("cannot run job: {detail}")]
    BadJob {
        /// What is wrong with it.
        detail: String,
    },
    /// A Job of the job's name exists in the namespace but kaapana-node did not create it for
    /// this job; the executor leaves it alone.
    #[error(
        "Job {name} in namespace {namespace} exists but is not kaapana-node's Job of job {job} \
         (its labels: {labels}); delete it or give the executor a namespace of its own"
    )]
    NotOurs {
        /// The Job's name.
        name: String,
        /// The namespace.
        namespace: String,
        /// The job id expected in its `kaapana.io/job-id` label.
        job: String,
        /// The labels it has.
        labels: String,
    },
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {op} in namespace {namespace} failed: {detail}; {hint}")]
    Api {
        /// The call, e.g. `create Job kn-…`.
        op: String,
        /// The namespace.
        namespace: String,
        /// The HTTP status, if the API server answered.
        code: Option<u16>,
        /// The API server's reason and message, or the transport error.
        detail: String,
        /// What to check or do.
        hint: String,
    },
    /// No client configuration (kubeconfig or in-cluster service account) could be loaded.
    #[error(
        "cannot configure the Kubernetes client: {detail}; set KUBECONFIG to a kubeconfig file, \
         or run the node in a pod with a service account"
    )]
    Client {
        /// kube's error.
        detail: String,
    },
}

impl KubernetesError {
    /// An [`KubernetesError::Api`] from kube's error, with a hint by status code.
    pub(crate) fn api(op: impl Into<String>, namespace: &str, e: &kube::Error) -> Self {
        let (code, detail) = match e {
            kube::Error::Api(s) => {
                let mut d = format!("{} {}", s.code, s.reason);
                if !s.message.is_empty() {
                    d.push_str(": ");
                    d.push_str(&s.message);
                }
                (Some(s.code), d)
            }
            other => (None, other.to_string()),
        };
        let hint = match code {
            Some(401) => "the API server refused the credentials: check the kubeconfig or the \
                          service account token"
                .to_owned(),
            Some(403) => format!(
                "the node's account needs permission in namespace {namespace} to create, get, \
                 list, watch and delete jobs (batch) and networkpolicies (networking.k8s.io), \
                 and to get, list and watch pods and get pods/log (see the Helm chart's Role)"
            ),
            Some(404) => format!("does namespace {namespace} exist?"),
            Some(409) => "another object of this name exists".to_owned(),
            Some(422) | Some(400) => "the API server rejected the object or request as \
                                      invalid: see its message"
                .to_owned(),
            Some(c) if c >= 500 => {
                "the API server failed: retry later or check its logs".to_owned()
            }
            Some(_) => "see the API server's message".to_owned(),
            None => "the API server could not be reached or answered something unexpected: \
                     check its address in the kubeconfig (or the in-cluster service) and the \
                     network"
                .to_owned(),
        };
        Self::Api { op: op.into(), namespace: namespace.to_owned(), code, detail, hint }
    }
}

/// Whether kube's error is the API server's status `code`.
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl From<KubernetesError> for ExecError {
    /// Configuration and job errors become [`ExecError::BadJob`]; failed API calls become
    /// [`ExecError::Io`] on a `kubernetes://<namespace>` pseudo-path, with the
    /// [`KubernetesError`] as the source.
    fn from(e: KubernetesError) -> Self {
        match e {
            KubernetesError::BadJob { detail } => ExecError::BadJob { detail },
            e @ (KubernetesError::Config { .. }
            | KubernetesError::NotOnVolume { .. }
            | KubernetesError::NotOurs { .. }) => ExecError::BadJob { detail: e.to_string() },
            e @ KubernetesError::Api { .. } => {
                let path = match &e {
                    KubernetesError::Api { namespace, .. } => format!("kubernetes://{namespace}"),
                    _ => "kubernetes://".to_owned(),
                };
                ExecError::Io { path: path.into(), source: std::io::Error::other(e) }
            }
            e @ KubernetesError::Client { .. } => {
                ExecError::Io { path: "kubernetes://".into(), source: std::io::Error::other(e) }
            }
        }
    }
}
