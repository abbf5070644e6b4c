//! A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, as a plain child process
//! on free loopback ports with a private storage folder and basic authentication; and the
//! real DICOM files that ship in the `pydicom` wheel (downloaded once with pip, unpacked with
//! Python's zipfile; no package is installed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The plugin Debian's `orthanc-dicomweb` installs.
const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";
/// The test user.
pub const USER: &str = "kaapana";
/// Its password.
pub const PASSWORD: &str = "kaapana-test-secret";

/// A running Orthanc; killed when dropped.
pub struct Orthanc {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its folder (config, storage, log).
    pub dir: PathBuf,
}

impl Orthanc {
    /// Starts Orthanc in `dir` and waits until its REST API answers.
    pub fn start(dir: &Path) -> Self {
        assert!(
            Path::new("/usr/sbin/Orthanc").exists() && Path::new(DICOMWEB_PLUGIN).exists(),
            "Orthanc is missing: apt-get install -y orthanc orthanc-dicomweb (scripts/test does)"
        );
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let (http, dicom) = (super::free_port(), super::free_port());
        let config = serde_json::json!({
            "Name": "kaapana-test-pacs",
            "StorageDirectory": dir.join("storage"),
            "IndexDirectory": dir.join("storage"),
            "HttpPort": http,
            "DicomPort": dicom,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": true,
            "RegisteredUsers": { USER: PASSWORD },
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let config_file = dir.join("orthanc.json");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
        let child = Command::new("/usr/sbin/Orthanc")
            .arg(&config_file)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start Orthanc");
        let me = Self { child, url: format!("http://127.0.0.1:{http}"), dir: dir.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if me.get("/system").is_ok() {
                return me;
            }
            assert!(Instant::now() < deadline, "Orthanc did not answer: {}", me.log());
            // Polls a process that is starting; there is no event to wait for.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its DICOMweb root.
    pub fn dicomweb(&self) -> String {
        format!("{}/dicom-web", self.url)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("orthanc.log")).unwrap_or_default()
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent()
    }

    fn basic() -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        format!("Basic {b64}")
    }

    /// `GET path` with the test user; the body, or the status.
    pub fn get(&self, path: &str) -> Result<String, u16> {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.url))
            .header("Authorization", Self::basic())
            .call()
            .map_err(|_| 0u16)?;
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        if status == 200 { Ok(body) } else { Err(status) }
    }

    /// `POST /instances` of one file: Orthanc's status and answer.
    fn post_instance(&self, file: &Path) -> (u16, String) {
        let bytes = std::fs::read(file).unwrap();
        let mut r = Self::agent()
            .post(format!("{}/instances", self.url))
            .header("Authorization", Self::basic())
            .header("Content-Type", "application/dicom")
            .send(&bytes[..])
            .unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// Uploads one DICOM file; its Orthanc answer.
    pub fn upload(&self, file: &Path) -> serde_json::Value {
        let (status, body) = self.post_instance(file);
        assert_eq!(status, 200, "uploading {}: {body}", file.display());
        serde_json::from_str(&body).unwrap()
    }

    /// Uploads every file Orthanc takes as DICOM; how many it took.
    pub fn upload_all(&self, files: &[PathBuf]) -> usize {
        files.iter().filter(|f| self.post_instance(f).0 == 200).count()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The DICOM files of the `pydicom` wheel's test data (`pydicom/data/test_files/**.dcm`),
/// downloaded into a cache under the system's temp folder once.
pub fn pydicom_files() -> Vec<PathBuf> {
    let cache = std::env::temp_dir().join("kaapana-node-pydicom");
    let unpacked = cache.join("unpacked");
    if !unpacked.join("pydicom").exists() {
        std::fs::create_dir_all(&cache).unwrap();
        let ok = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"])
            .arg(&cache)
            .arg("pydicom")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot download the pydicom wheel with `python3 -m pip download pydicom`");
        let wheel = std::fs::read_dir(&cache)
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
    }
    let mut files = Vec::new();
    collect_dcm(&unpacked.join("pydicom/data/test_files"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .dcm files in the pydicom wheel");
    files
}

fn collect_dcm(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            collect_dcm(&p, out);
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("dcm")) {
            out.push(p);
        }
    }
}
