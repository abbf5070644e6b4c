//! The CLI's side of the local API: finding a running daemon and calling it.
//!
//! A running daemon writes its API address to `DIR/api-address` and removes it when it stops.
//! CLI commands that change or show live state use the API when the daemon answers there, and
//! work on the data directory directly when no daemon runs (the store can only be opened by
//! one process at a time).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::views::{AddInstanceRequest, ErrorBody, InstanceView, SendRequest, SendResponse};
use crate::data_dir::DataDir;

const ADDRESS_FILE: &str = "api-address";

/// Records the API address of the daemon running on `dir`.
pub fn write_api_address(dir: &DataDir, addr: SocketAddr) -> io::Result<()> {
    let tmp = dir.root().join(format!("{ADDRESS_FILE}.tmp"));
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, dir.root().join(ADDRESS_FILE))
}

/// Removes the record (on shutdown).
pub fn remove_api_address(dir: &DataDir) {
    let _ = std::fs::remove_file(dir.root().join(ADDRESS_FILE));
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// The daemon could not be reached or answered nonsense.
    #[error("cannot talk to the daemon at {addr}: {detail}")]
    Transport {
        /// Its address.
        addr: String,
        /// What failed.
        detail: String,
    },
}

/// A client of one running daemon's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// The daemon running on `dir`, if one answers; `None` when none runs.
    pub fn connect(dir: &DataDir) -> Option<Self> {
        let addr = std::fs::read_to_string(dir.root().join(ADDRESS_FILE)).ok()?;
        let token = std::fs::read_to_string(dir.api_token_path()).ok()?;
        let client = Self::new(addr.trim(), token.trim());
        client.get::<serde_json::Value>("/v1/info").ok().map(|_| client)
    }

    /// A client for the API at `addr` (`host:port`) with `token`.
    pub fn new(addr: &str, token: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Self { base: format!("http://{addr}"), token: token.to_owned(), agent }
    }

    /// The API's base URL, `http://host:port` (the dashboard is served there too).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport { addr: self.base.clone(), detail: e.to_string() }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = r.map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        if status >= 400 {
            let message = match response.body_mut().read_json::<ErrorBody>() {
                Ok(b) => b.error,
                Err(_) => format!("the daemon answered HTTP {status}"),
            };
            return Err(ClientError::Api { status, message });
        }
        response.body_mut().read_json().map_err(|e| self.transport(e))
    }

    /// `GET path` → JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(r)
    }

    /// `GET path` → text.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| self.transport(e))?;
        if status >= 400 {
            let message = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error);
            return Err(ClientError::Api { status, message });
        }
        Ok(text)
    }

    /// `GET path` → its body, at most `limit` bytes (a result bundle).
    pub fn get_bytes(&self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.transport(e))?;
        if status >= 400 {
            let text = String::from_utf8_lossy(&body).into_owned();
            let message = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error);
            return Err(ClientError::Api { status, message });
        }
        Ok(body)
    }

    /// `POST path` with a JSON body → JSON.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(r)
    }

    /// `PUT path` with a JSON body → JSON.
    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let r = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(r)
    }

    /// `DELETE path` → JSON.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(r)
    }

    /// Registered instances with their live state.
    pub fn instances(&self) -> Result<Vec<InstanceView>, ClientError> {
        self.get("/v1/instances")
    }

    /// Registers an instance.
    pub fn add_instance(&self, req: &AddInstanceRequest) -> Result<InstanceView, ClientError> {
        self.post("/v1/instances", req)
    }

    /// Unregisters an instance (name or id).
    pub fn remove_instance(&self, which: &str) -> Result<InstanceView, ClientError> {
        self.delete(&format!("/v1/instances/{}", encode_path(which)))
    }

    /// Queues a message.
    pub fn send(&self, req: &SendRequest) -> Result<SendResponse, ClientError> {
        self.post("/v1/messages", req)
    }
}

/// Percent-encodes a path segment.
fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Whether `dir` has an API address file (a daemon ran or runs there).
pub fn has_address_file(dir: &Path) -> bool {
    dir.join(ADDRESS_FILE).exists()
}
