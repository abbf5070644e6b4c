//! The Kubernetes executor's real client (rustls with ring, from a kubeconfig file) against an
//! address where no API server listens: it is built without a TLS provider panic, and its
//! errors say what to check. (No API server can run on these machines; the flow is tested
//! against a mock in `kubernetes_mock.rs`.)
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kaapana_executor::kubernetes::{
    DataVolume, KubernetesConfig, KubernetesError, KubernetesExecutor, VolumeSource,
};
use kaapana_executor::{ExecError, Executor};

fn config(data: &std::path::Path) -> KubernetesConfig {
    KubernetesConfig {
        image_repository: "registry.example.org/kaapana/jobs".into(),
        volumes: vec![DataVolume {
            local_path: data.to_owned(),
            source: VolumeSource::HostPath { path: data.to_owned() },
        }],
        ..KubernetesConfig::default()
    }
}

#[tokio::test]
async fn a_kubeconfig_client_without_a_server_fails_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    // A loopback port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
             insecure-skip-tls-verify: true\n\
             users:\n- name: test\n  user:\n    token: not-a-real-token\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n"
        ),
    )
    .unwrap();
    let executor = KubernetesExecutor::from_kubeconfig(&kubeconfig, config(tmp.path()))
        .await
        .expect("a client is built from the kubeconfig (rustls with ring)");
    let e = executor.running().await.unwrap_err();
    let ExecError::Io { path, source } = &e else { panic!("not an API error: {e}") };
    assert_eq!(path.to_str(), Some("kubernetes://kaapana-jobs"));
    let text = source.to_string();
    assert!(text.contains("list Jobs") && text.contains("could not be reached"), "{text}");
}

#[tokio::test]
async fn a_missing_kubeconfig_says_what_to_set() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-kubeconfig");
    let e = KubernetesExecutor::from_kubeconfig(&missing, config(tmp.path())).await.unwrap_err();
    assert!(matches!(e, KubernetesError::Client { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("no-such-kubeconfig") && text.contains("KUBECONFIG"), "{text}");
    // A bad configuration is refused before any client is made.
    let bad = KubernetesConfig { image_repository: String::new(), ..config(tmp.path()) };
    let e = KubernetesExecutor::from_kubeconfig(&missing, bad).await.unwrap_err();
    assert!(matches!(e, KubernetesError::Config { .. }), "{e}");
}
