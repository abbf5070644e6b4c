//! A local PACS for the demo and the tests: Debian's Orthanc (`orthanc`) with its DICOMweb
//! plugin (`orthanc-dicomweb`), run as a plain child process from a JSON config of its own, on
//! loopback ports the caller chose, with a private storage folder and basic authentication.
//!
//! This is not how a site's PACS is run (Kaapana runs dcm4chee, which the node only reaches
//! over DICOMweb, see [`crate::pacs`]); it exists so that the demo and the tests exercise a
//! real DICOMweb server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's Orthanc.
pub const ORTHANC: &str = "/usr/sbin/Orthanc";
/// The plugin Debian's `orthanc-dicomweb` installs.
pub const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// Why Orthanc could not be started or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrthancError {
    /// Not installed.
    #[error("Orthanc is missing: apt-get install -y orthanc orthanc-dicomweb")]
    Missing,
    /// A file of its folder.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It did not come up.
    #[error("Orthanc did not answer within {secs} s; its log ({log}) ends with:\n{tail}")]
    NotReady {
        /// How long it was given.
        secs: u64,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// A request failed.
    #[error("Orthanc {what}: {why}")]
    Request {
        /// What was asked.
        what: String,
        /// Its answer, or the transport error.
        why: String,
    },
}

/// How to run one Orthanc.
#[derive(Clone, Debug)]
pub struct OrthancConfig {
    /// Its AE title and name (shown in its logs).
    pub name: String,
    /// The HTTP port on 127.0.0.1 (REST and DICOMweb).
    pub http_port: u16,
    /// The DICOM port on 127.0.0.1.
    pub dicom_port: u16,
    /// The one user.
    pub user: String,
    /// Its password.
    pub password: String,
}

/// A running Orthanc; killed when dropped.
#[derive(Debug)]
pub struct Orthanc {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its folder (config, storage, log).
    pub dir: PathBuf,
    config: OrthancConfig,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OrthancError + '_ {
    move |source| OrthancError::Io { path: path.to_owned(), source }
}

impl Orthanc {
    /// Whether Orthanc and its DICOMweb plugin are installed.
    pub fn installed() -> bool {
        Path::new(ORTHANC).exists() && Path::new(DICOMWEB_PLUGIN).exists()
    }

    /// Starts Orthanc in `dir` (created) and waits until its REST API answers.
    pub fn start(dir: &Path, config: OrthancConfig) -> Result<Self, OrthancError> {
        if !Self::installed() {
            return Err(OrthancError::Missing);
        }
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).map_err(io(&storage))?;
        let json = serde_json::json!({
            "Name": config.name,
            "DicomAet": "KAAPANA",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": config.http_port,
            "DicomPort": config.dicom_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": true,
            "RegisteredUsers": { config.user.clone(): config.password.clone() },
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let config_file = dir.join("orthanc.json");
        let text = serde_json::to_vec_pretty(&json).unwrap_or_default();
        std::fs::write(&config_file, text).map_err(io(&config_file))?;
        let log_file = dir.join("orthanc.log");
        let log = std::fs::File::create(&log_file).map_err(io(&log_file))?;
        let err = log.try_clone().map_err(io(&log_file))?;
        let child = Command::new(ORTHANC)
            .arg(&config_file)
            .stdout(log)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io(Path::new(ORTHANC)))?;
        let me = Self {
            child,
            url: format!("http://127.0.0.1:{}", config.http_port),
            dir: dir.to_owned(),
            config,
        };
        let timeout = Duration::from_secs(60);
        let deadline = Instant::now() + timeout;
        while me.get("/system").is_err() {
            if Instant::now() >= deadline {
                let log = me.log();
                let tail = log.lines().rev().take(20).collect::<Vec<_>>();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                return Err(OrthancError::NotReady {
                    secs: timeout.as_secs(),
                    log: log_file.display().to_string(),
                    tail,
                });
            }
            // Polls a process that is starting; there is no event to wait for.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    /// Its DICOMweb root.
    pub fn dicomweb(&self) -> String {
        format!("{}/dicom-web", self.url)
    }

    /// Its user and password.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.config.user, &self.config.password)
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

    fn basic(&self) -> String {
        use base64::Engine;
        let (user, password) = self.credentials();
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {b64}")
    }

    /// `GET path` of its REST API: the body, or the status (0: no answer).
    pub fn get(&self, path: &str) -> Result<String, u16> {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.url))
            .header("Authorization", self.basic())
            .call()
            .map_err(|_| 0u16)?;
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        if status == 200 { Ok(body) } else { Err(status) }
    }

    /// `DELETE path` of its REST API.
    pub fn delete(&self, path: &str) -> Result<(), OrthancError> {
        let r = Self::agent()
            .delete(format!("{}{path}", self.url))
            .header("Authorization", self.basic())
            .call()
            .map_err(|e| OrthancError::Request {
                what: format!("DELETE {path}"),
                why: e.to_string(),
            })?;
        match r.status().as_u16() {
            200 => Ok(()),
            s => Err(OrthancError::Request {
                what: format!("DELETE {path}"),
                why: format!("HTTP {s}"),
            }),
        }
    }

    /// `POST /instances` of one DICOM file's bytes: Orthanc's status and answer.
    pub fn post_instance(&self, bytes: &[u8]) -> Result<(u16, String), OrthancError> {
        let mut r = Self::agent()
            .post(format!("{}/instances", self.url))
            .header("Authorization", self.basic())
            .header("Content-Type", "application/dicom")
            .send(bytes)
            .map_err(|e| OrthancError::Request {
                what: "POST /instances".into(),
                why: e.to_string(),
            })?;
        let status = r.status().as_u16();
        Ok((status, r.body_mut().read_to_string().unwrap_or_default()))
    }

    /// Stores one DICOM file; Orthanc's answer (its ids of the instance, series, study).
    pub fn upload(&self, file: &Path) -> Result<serde_json::Value, OrthancError> {
        let bytes = std::fs::read(file).map_err(io(file))?;
        let what = format!("storing {}", file.display());
        match self.post_instance(&bytes)? {
            (200, body) => serde_json::from_str(&body)
                .map_err(|e| OrthancError::Request { what, why: e.to_string() }),
            (status, body) => {
                Err(OrthancError::Request { what, why: format!("HTTP {status}: {body}") })
            }
        }
    }

    /// Stores every `.dcm` file under `folder` (recursively); how many it stored.
    pub fn upload_folder(&self, folder: &Path) -> Result<usize, OrthancError> {
        let mut files = Vec::new();
        collect_dcm(folder, &mut files);
        files.sort();
        for f in &files {
            self.upload(f)?;
        }
        Ok(files.len())
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `*.dcm` file under `dir`, recursively (unreadable folders are skipped).
pub fn collect_dcm(dir: &Path, out: &mut Vec<PathBuf>) {
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
