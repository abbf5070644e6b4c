//! A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, as a plain child process
//! on free loopback ports with a private storage folder and basic authentication; and the
//! real DICOM files that ship in the `pydicom` wheel (downloaded once with pip, unpacked with
//! Python's zipfile; no package is installed).

use std::path::PathBuf;
use std::process::Command;

pub use kaapana_node::orthanc::Orthanc;
use kaapana_node::orthanc::{OrthancConfig, collect_dcm};

/// The test user.
pub const USER: &str = "kaapana";
/// Its password.
pub const PASSWORD: &str = "kaapana-test-secret";

/// Starts an Orthanc in `dir` on free ports with the test user.
pub fn start(dir: &std::path::Path) -> Orthanc {
    let config = OrthancConfig {
        name: "kaapana-test-pacs".into(),
        http_port: super::free_port(),
        dicom_port: super::free_port(),
        user: USER.into(),
        password: PASSWORD.into(),
    };
    Orthanc::start(dir, config).unwrap_or_else(|e| panic!("{e}"))
}

/// Uploads every file Orthanc takes as DICOM; how many it took.
pub fn upload_all(orthanc: &Orthanc, files: &[PathBuf]) -> usize {
    files
        .iter()
        .filter(|f| orthanc.post_instance(&std::fs::read(f).unwrap()).unwrap().0 == 200)
        .count()
}

/// The DICOM files of the `pydicom` wheel's test data (`pydicom/data/test_files/**.dcm`),
/// downloaded into a cache under the system's temp folder once.
pub fn pydicom_files() -> Vec<PathBuf> {
    let cache = std::env::temp_dir().join("kaapana-node-pydicom");
    let unpacked = cache.join("unpacked");
    // One download at a time in this process; other test binaries download into folders
    // of their own, so no one unpacks a wheel another pip is still writing.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !unpacked.join("pydicom").exists() {
        let download = cache.join(format!("download-{}", std::process::id()));
        std::fs::create_dir_all(&download).unwrap();
        let ok = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"])
            .arg(&download)
            .arg("pydicom")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot download the pydicom wheel with `python3 -m pip download pydicom`");
        let wheel = std::fs::read_dir(&download)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .expect("pip downloaded no wheel");
        let tmp = cache.join(format!("unpacking-{}", std::process::id()));
        let ok = Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&tmp)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot unpack {}", wheel.display());
        // Another test may have won the race; either copy is complete.
        let _ = std::fs::rename(&tmp, &unpacked);
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(&download);
    }
    let mut files = Vec::new();
    collect_dcm(&unpacked.join("pydicom/data/test_files"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .dcm files in the pydicom wheel");
    files
}
