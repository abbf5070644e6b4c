//! The site's PACS over DICOMweb: QIDO-RS to find and describe series.
//!
//! In Kaapana a dataset is a list of DICOM identifiers held in the platform's PACS (dcm4chee
//! behind DICOMweb). [`DicomWeb::series`] resolves a query (series or study instance UIDs, or
//! attribute matches such as `Modality=CT`) to the series it names, with each series' study,
//! modality and number of instances, from the PACS's `/series` QIDO-RS resource
//! (`application/dicom+json`). Nothing read here is ever sent to a peer: peers see counts and
//! per-peer tokens ([`crate::datasets`]).
//!
//! WADO-RS ([`DicomWeb::retrieve_series`]) fetches a series' instances as the PACS stores
//! them (`transfer-syntax=*`), parsing the `multipart/related` answer as it streams in: each
//! instance goes to an [`InstanceSink`] chunk by chunk, so a series is never held in memory.
//! [`DicomWeb::series_size`] estimates a series' pixel-data size from QIDO-RS instance
//! attributes (QIDO gives no byte sizes).
//!
//! Credentials stay in files ([`PacsCredentials`]): a dataset record keeps the file's path and
//! the secret is read each time it is used.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// How to authenticate to the PACS.
#[derive(Clone, PartialEq, Eq)]
pub enum PacsAuth {
    /// None.
    None,
    /// HTTP basic authentication.
    Basic {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A bearer token.
    Bearer(String),
}

impl std::fmt::Debug for PacsAuth {
    /// Never shows a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Basic { .. } => "Basic(..)",
            Self::Bearer(_) => "Bearer(..)",
        })
    }
}

/// Why a PACS request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PacsError {
    /// The PACS did not answer.
    #[error("the PACS at {url} cannot be reached: {detail}; is it running, and is the URL right?")]
    Unreachable {
        /// The request.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The PACS refused the credentials.
    #[error(
        "the PACS at {url} refused the credentials (HTTP {status}); check the user and password or token file"
    )]
    Unauthorized {
        /// The request.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// Another error status.
    #[error("the PACS answered HTTP {status} to {url}: {body}")]
    Status {
        /// The request.
        url: String,
        /// The status.
        status: u16,
        /// The start of its answer.
        body: String,
    },
    /// The answer is not the DICOM JSON model this expects.
    #[error("the PACS's answer to {url} is not DICOM JSON as QIDO-RS returns it: {detail}")]
    Malformed {
        /// The request.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// The PACS lists one series UID more than once (for different patients or studies).
    #[error(
        "the PACS at {url} lists series {series} more than once (under different patients or studies): its UIDs break the DICOM model, so WADO-RS cannot retrieve it unambiguously; fix it in the PACS or select the other series by UID"
    )]
    Ambiguous {
        /// The DICOMweb URL.
        url: String,
        /// The series UID.
        series: String,
    },
    /// A query term is not `KEYWORD=value`.
    #[error("query term `{0}` is not KEYWORD=value (e.g. Modality=CT)")]
    BadQuery(String),
    /// The file with the password or token cannot be used.
    #[error("cannot use the PACS credentials file {}: {detail}", path.display())]
    Secret {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// How a dataset record keeps the PACS's credentials: the secret stays in its file (read each
/// time it is used, so that it can be rotated without registering the dataset again), never in
/// the store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PacsCredentials {
    /// No authentication.
    None,
    /// HTTP basic authentication with the password in a file.
    Basic {
        /// The user.
        user: String,
        /// The absolute path of the file holding the password.
        password_file: PathBuf,
    },
    /// A bearer token in a file.
    Bearer {
        /// The absolute path of the file holding the token.
        token_file: PathBuf,
    },
}

impl PacsCredentials {
    /// Reads the secret: the file's text without its trailing line break. A file that group or
    /// others may read or write is refused, as ssh refuses such keys.
    pub fn load(&self) -> Result<PacsAuth, PacsError> {
        match self {
            Self::None => Ok(PacsAuth::None),
            Self::Basic { user, password_file } => {
                Ok(PacsAuth::Basic { user: user.clone(), password: read_secret(password_file)? })
            }
            Self::Bearer { token_file } => Ok(PacsAuth::Bearer(read_secret(token_file)?)),
        }
    }

    /// The file the secret is in, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::None => None,
            Self::Basic { password_file, .. } => Some(password_file),
            Self::Bearer { token_file } => Some(token_file),
        }
    }
}

pub(crate) fn read_secret(path: &Path) -> Result<String, PacsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |detail: String| PacsError::Secret { path: path.to_owned(), detail };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "group or others may read or write it (mode {mode:04o}); `chmod 600 {}`",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(err("it is empty".into()));
    }
    Ok(secret.to_owned())
}

/// A series' size as estimated from QIDO-RS instance attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeriesSize {
    /// Instances QIDO-RS listed.
    pub instances: u64,
    /// Their pixel data: Rows × Columns × BitsAllocated/8 × SamplesPerPixel × NumberOfFrames,
    /// summed (instances without pixel attributes count 0).
    pub pixel_bytes: u64,
}

/// Receives the instances of a WADO-RS answer, one at a time, as they stream in.
pub trait InstanceSink {
    /// Instance `index` (from 0) begins.
    fn begin(&mut self, index: usize) -> std::io::Result<()>;
    /// The next bytes of the current instance.
    fn data(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// The current instance is complete.
    fn end(&mut self) -> std::io::Result<()>;
}

/// Why a WADO-RS retrieval failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetrieveError {
    /// The PACS or the transfer.
    #[error(transparent)]
    Pacs(#[from] PacsError),
    /// The sink (writing the files).
    #[error("cannot write the retrieved instances: {0}")]
    Sink(#[source] std::io::Error),
}

/// One series as QIDO-RS describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesInfo {
    /// Its SeriesInstanceUID (0020,000E).
    pub series_uid: String,
    /// Its StudyInstanceUID (0020,000D).
    pub study_uid: String,
    /// Its Modality (0008,0060), if the PACS gave one.
    pub modality: Option<String>,
    /// NumberOfSeriesRelatedInstances (0020,1209), 0 if not given.
    pub instances: u64,
}

/// What a dataset is made of: series by UID, all series of studies, or an attribute query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeriesQuery {
    /// These series.
    Series(Vec<String>),
    /// Every series of these studies.
    Studies(Vec<String>),
    /// Every series matching these `KEYWORD=value` terms (QIDO-RS matching).
    Match(Vec<(String, String)>),
}

impl SeriesQuery {
    /// Parses `Modality=CT&BodyPartExamined=CHEST`.
    pub fn parse_match(text: &str) -> Result<Self, PacsError> {
        let mut terms = Vec::new();
        for term in text.split('&').filter(|t| !t.is_empty()) {
            let (k, v) = term.split_once('=').ok_or_else(|| PacsError::BadQuery(term.into()))?;
            let keyword_ok = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric());
            if !keyword_ok || v.is_empty() {
                return Err(PacsError::BadQuery(term.into()));
            }
            terms.push((k.to_owned(), v.to_owned()));
        }
        if terms.is_empty() {
            return Err(PacsError::BadQuery(text.into()));
        }
        Ok(Self::Match(terms))
    }
}

/// A DICOMweb endpoint: the URL QIDO-RS and WADO-RS resources hang off (e.g.
/// `http://pacs:8042/dicom-web`).
#[derive(Debug)]
pub struct DicomWeb {
    base: String,
    auth: PacsAuth,
    agent: ureq::Agent,
    /// For WADO-RS retrievals (no overall time limit).
    bulk: ureq::Agent,
}

/// The attributes asked for with every series.
const SERIES_FIELDS: &[&str] = &["0020000D", "00080060", "00201209"];
/// The attributes of an instance's pixel data size: Rows, Columns, BitsAllocated,
/// SamplesPerPixel, NumberOfFrames.
const PIXEL_FIELDS: &[&str] = &["00280010", "00280011", "00280100", "00280002", "00280008"];
/// What WADO-RS is asked for: every instance as stored (no transcoding).
pub const WADO_ACCEPT: &str = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";

impl DicomWeb {
    /// The endpoint at `base`.
    pub fn new(base: &str, auth: PacsAuth) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        // A series can take long to arrive; the connection and the answer's start must not.
        let bulk = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(300)))
            .timeout_recv_body(Some(Duration::from_secs(4 * 3600)))
            .build()
            .new_agent();
        Self { base: base.trim_end_matches('/').to_owned(), auth, agent, bulk }
    }

    /// The endpoint's URL (without a trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Estimates the pixel-data size of a series from QIDO-RS instance attributes.
    pub fn series_size(&self, study: &str, series: &str) -> Result<SeriesSize, PacsError> {
        let mut url =
            format!("{}/studies/{}/series/{}/instances?", self.base, encode(study), encode(series));
        for f in PIXEL_FIELDS {
            url.push_str(&format!("includefield={f}&"));
        }
        url.pop();
        let text = self.get(&url, "application/dicom+json")?;
        if text.trim().is_empty() {
            return Ok(SeriesSize::default());
        }
        let malformed = |detail: String| PacsError::Malformed { url: url.clone(), detail };
        let value: Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        let Value::Array(items) = value else {
            return Err(malformed("not a JSON array".into()));
        };
        let mut size = SeriesSize { instances: items.len() as u64, pixel_bytes: 0 };
        for item in &items {
            size.pixel_bytes = size.pixel_bytes.saturating_add(pixel_bytes(item));
        }
        Ok(size)
    }

    /// Retrieves every instance of a series by WADO-RS (`GET
    /// {base}/studies/{study}/series/{series}`, `Accept: multipart/related;
    /// type="application/dicom"; transfer-syntax=*`), handing each to `sink` as it streams in;
    /// how many instances there were. A series the PACS does not hold is
    /// [`PacsError::Status`] 404 (or zero instances, with some servers).
    pub fn retrieve_series(
        &self,
        study: &str,
        series: &str,
        sink: &mut dyn InstanceSink,
    ) -> Result<usize, RetrieveError> {
        let url = format!("{}/studies/{}/series/{}", self.base, encode(study), encode(series));
        let req = self.authorize(self.bulk.get(&url).header("Accept", WADO_ACCEPT));
        let mut response = req
            .call()
            .map_err(|e| PacsError::Unreachable { url: url.clone(), detail: e.to_string() })?;
        let status = response.status().as_u16();
        match status {
            200 | 206 => {}
            204 => return Ok(0),
            401 | 403 => return Err(PacsError::Unauthorized { url, status }.into()),
            _ => {
                let body = response.body_mut().read_to_string().unwrap_or_default();
                let body = body.chars().take(200).collect();
                return Err(PacsError::Status { url, status, body }.into());
            }
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let Some(boundary) = boundary(&content_type) else {
            let detail = format!("Content-Type {content_type:?} is not multipart/related");
            return Err(PacsError::Malformed { url, detail }.into());
        };
        let reader = response.body_mut().as_reader();
        read_multipart(reader, &boundary, sink).map_err(|e| match e {
            MultipartError::Read(e) => RetrieveError::Pacs(PacsError::Unreachable {
                url: url.clone(),
                detail: format!("the answer broke off: {e}"),
            }),
            MultipartError::Sink(e) => RetrieveError::Sink(e),
            MultipartError::Malformed(detail) => {
                RetrieveError::Pacs(PacsError::Malformed { url: url.clone(), detail })
            }
        })
    }

    fn authorize(
        &self,
        mut req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        match &self.auth {
            PacsAuth::None => {}
            PacsAuth::Basic { user, password } => {
                use base64::Engine;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                req = req.header("Authorization", format!("Basic {token}"));
            }
            PacsAuth::Bearer(token) => {
                req = req.header("Authorization", format!("Bearer {token}"));
            }
        }
        req
    }

    /// The series `query` names, in the order the PACS lists them, each once. A series UID
    /// that one answer lists twice is [`PacsError::Ambiguous`].
    pub fn series(&self, query: &SeriesQuery) -> Result<Vec<SeriesInfo>, PacsError> {
        let mut out: Vec<SeriesInfo> = Vec::new();
        let push = |found: Vec<SeriesInfo>, out: &mut Vec<SeriesInfo>| {
            let mut this_answer: Vec<String> = Vec::with_capacity(found.len());
            for s in found {
                if this_answer.contains(&s.series_uid) {
                    return Err(PacsError::Ambiguous {
                        url: self.base.clone(),
                        series: s.series_uid,
                    });
                }
                this_answer.push(s.series_uid.clone());
                if !out.iter().any(|o| o.series_uid == s.series_uid) {
                    out.push(s);
                }
            }
            Ok(())
        };
        match query {
            SeriesQuery::Series(uids) => {
                for uid in uids {
                    let found = self.qido(&[("SeriesInstanceUID".into(), uid.clone())])?;
                    push(found, &mut out)?;
                }
            }
            SeriesQuery::Studies(uids) => {
                for uid in uids {
                    let found = self.qido(&[("StudyInstanceUID".into(), uid.clone())])?;
                    push(found, &mut out)?;
                }
            }
            SeriesQuery::Match(terms) => push(self.qido(terms)?, &mut out)?,
        }
        Ok(out)
    }

    /// One QIDO-RS `/series` search.
    fn qido(&self, terms: &[(String, String)]) -> Result<Vec<SeriesInfo>, PacsError> {
        let mut url = format!("{}/series?", self.base);
        for (k, v) in terms {
            url.push_str(&format!("{}={}&", encode(k), encode(v)));
        }
        for f in SERIES_FIELDS {
            url.push_str(&format!("includefield={f}&"));
        }
        url.pop();
        let text = self.get(&url, "application/dicom+json")?;
        if text.trim().is_empty() {
            // Some servers answer 204 with no body for no match.
            return Ok(Vec::new());
        }
        let malformed = |detail: String| PacsError::Malformed { url: url.clone(), detail };
        let value: Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        let Value::Array(items) = value else {
            return Err(malformed("not a JSON array".into()));
        };
        items
            .iter()
            .map(|item| {
                let series_uid = string_attr(item, "0020000E")
                    .ok_or_else(|| malformed("a series without SeriesInstanceUID".into()))?;
                Ok(SeriesInfo {
                    series_uid,
                    study_uid: string_attr(item, "0020000D").unwrap_or_default(),
                    modality: string_attr(item, "00080060"),
                    instances: number_attr(item, "00201209").unwrap_or(0),
                })
            })
            .collect()
    }

    fn get(&self, url: &str, accept: &str) -> Result<String, PacsError> {
        let req = self.authorize(self.agent.get(url).header("Accept", accept));
        let mut response = req
            .call()
            .map_err(|e| PacsError::Unreachable { url: url.to_owned(), detail: e.to_string() })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| PacsError::Unreachable { url: url.to_owned(), detail: e.to_string() })?;
        match status {
            200..=299 => Ok(body),
            401 | 403 => Err(PacsError::Unauthorized { url: url.to_owned(), status }),
            _ => Err(PacsError::Status {
                url: url.to_owned(),
                status,
                body: body.chars().take(200).collect(),
            }),
        }
    }
}

/// The first value of attribute `tag` (8 hex digits) as text.
fn string_attr(item: &Value, tag: &str) -> Option<String> {
    match item.get(tag)?.get("Value")?.get(0)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The first value of attribute `tag` as a number (IS values may come as strings).
fn number_attr(item: &Value, tag: &str) -> Option<u64> {
    match item.get(tag)?.get("Value")?.get(0)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An instance's pixel data size from its DICOM JSON attributes (0 without Rows/Columns).
fn pixel_bytes(item: &Value) -> u64 {
    let n = |tag: &str, default: u64| number_attr(item, tag).unwrap_or(default);
    let (rows, cols) = (n("00280010", 0), n("00280011", 0));
    let bits = n("00280100", 8);
    let samples = n("00280002", 1).max(1);
    let frames = n("00280008", 1).max(1);
    let bits_total = u128::from(rows) * u128::from(cols) * u128::from(bits);
    let bytes = bits_total.div_ceil(8) * u128::from(samples) * u128::from(frames);
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// The `boundary` parameter of a `multipart/related` Content-Type.
fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/related") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= 200).then(|| v.to_owned())
    })
}

/// Why a multipart body could not be read.
#[derive(Debug)]
enum MultipartError {
    /// Reading the body.
    Read(std::io::Error),
    /// The sink.
    Sink(std::io::Error),
    /// Not a multipart body with this boundary.
    Malformed(String),
}

/// How much of the body is read ahead (and the most handed to the sink at once).
const READ_AHEAD: usize = 1 << 20;
/// The longest part header block accepted.
const MAX_PART_HEADERS: usize = 64 * 1024;

/// A read-ahead buffer over the body.
struct Input<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Input<R> {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more (at least some bytes, up to the buffer's room, until a good amount is
    /// waiting); false at the end of the body.
    fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let before = self.end;
        while self.end < self.buf.len() && self.end - before < READ_AHEAD / 4 {
            match self.r.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MultipartError::Read(e)),
            }
        }
        Ok(self.end > before)
    }

    /// Makes at least `n` bytes pending; false if the body ends first.
    fn want(&mut self, n: usize) -> Result<bool, MultipartError> {
        while self.end - self.start < n {
            if !self.fill()? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Reads a `multipart/related` body part by part into `sink`; the number of parts.
fn read_multipart<R: Read>(
    r: R,
    boundary: &str,
    sink: &mut dyn InstanceSink,
) -> Result<usize, MultipartError> {
    let malformed = |s: &str| MultipartError::Malformed(s.to_owned());
    // Every delimiter is CRLF "--" boundary; the body is read as if a CRLF preceded it, so the
    // first one (which may start the body) is found the same way.
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    let finder = memchr::memmem::Finder::new(&delimiter);
    let mut buf = vec![0u8; READ_AHEAD + delimiter.len()];
    buf[..2].copy_from_slice(b"\r\n");
    let mut input = Input { r, buf, start: 0, end: 2, eof: false };
    // The preamble, up to the first delimiter.
    loop {
        if let Some(i) = finder.find(input.pending()) {
            input.start += i + delimiter.len();
            break;
        }
        let keep = input.pending().len().min(delimiter.len() - 1);
        input.start = input.end - keep;
        if !input.fill()? {
            return Err(malformed("the answer holds no part (no multipart boundary)"));
        }
    }
    let mut parts = 0usize;
    loop {
        // After a delimiter: "--" closes the body; else optional blanks, then CRLF.
        if !input.want(2)? {
            return Err(malformed("the answer ends after a boundary"));
        }
        if input.pending().starts_with(b"--") {
            return Ok(parts);
        }
        loop {
            if !input.want(2)? {
                return Err(malformed("the answer ends after a boundary"));
            }
            match input.pending()[0] {
                b' ' | b'\t' => input.start += 1,
                b'\r' if input.pending()[1] == b'\n' => {
                    input.start += 2;
                    break;
                }
                _ => return Err(malformed("a boundary line is not followed by a line break")),
            }
        }
        // The part's headers end with an empty line (which may come right away: no headers).
        loop {
            if input.pending().starts_with(b"\r\n") {
                input.start += 2;
                break;
            }
            if let Some(i) = memchr::memmem::find(input.pending(), b"\r\n\r\n") {
                input.start += i + 4;
                break;
            }
            if input.pending().len() > MAX_PART_HEADERS {
                return Err(malformed("a part's headers are too long"));
            }
            if !input.fill()? {
                return Err(malformed("the answer ends inside a part's headers"));
            }
        }
        // The body, up to the next delimiter.
        sink.begin(parts).map_err(MultipartError::Sink)?;
        loop {
            let pending = input.pending();
            if let Some(i) = finder.find(pending) {
                sink.data(&pending[..i]).map_err(MultipartError::Sink)?;
                input.start += i + delimiter.len();
                break;
            }
            let emit = pending.len().saturating_sub(delimiter.len() - 1);
            if emit > 0 {
                sink.data(&pending[..emit]).map_err(MultipartError::Sink)?;
                input.start += emit;
            }
            if !input.fill()? {
                return Err(malformed("the answer ends inside a part"));
            }
        }
        sink.end().map_err(MultipartError::Sink)?;
        parts += 1;
    }
}

/// Percent-encodes a query component (unreserved characters stay).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~*".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_or_say_what_is_wrong() {
        assert_eq!(
            SeriesQuery::parse_match("Modality=CT&BodyPartExamined=CHEST").unwrap(),
            SeriesQuery::Match(vec![
                ("Modality".into(), "CT".into()),
                ("BodyPartExamined".into(), "CHEST".into())
            ])
        );
        for bad in ["", "Modality", "=CT", "Modality=", "Mod ality=CT"] {
            assert!(SeriesQuery::parse_match(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dicom_json_attributes_are_read_as_qido_returns_them() {
        let item: Value = serde_json::from_str(
            r#"{"0020000E":{"vr":"UI","Value":["1.2.3"]},"00201209":{"vr":"IS","Value":[12]},
                "00080060":{"vr":"CS","Value":["CT"]},"0020000D":{"vr":"UI"}}"#,
        )
        .unwrap();
        assert_eq!(string_attr(&item, "0020000E").as_deref(), Some("1.2.3"));
        assert_eq!(number_attr(&item, "00201209"), Some(12));
        assert_eq!(string_attr(&item, "0020000D"), None);
        assert_eq!(encode("1.2 3&x"), "1.2%203%26x");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let auth = PacsAuth::Basic { user: "u".into(), password: "hunter2".into() };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", PacsAuth::Bearer("tok".into())).contains("tok"));
    }

    /// Collects parts in memory.
    #[derive(Default)]
    struct Parts(Vec<Vec<u8>>);

    impl InstanceSink for Parts {
        fn begin(&mut self, index: usize) -> std::io::Result<()> {
            assert_eq!(index, self.0.len());
            self.0.push(Vec::new());
            Ok(())
        }
        fn data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.0.last_mut().unwrap().extend_from_slice(bytes);
            Ok(())
        }
        fn end(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Hands out its bytes `step` at a time (to cut boundaries anywhere).
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(out.len()).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn multipart_bodies_are_split_into_their_parts_whatever_the_read_sizes() {
        let b = "7d2c1a";
        let parts: Vec<Vec<u8>> = vec![
            b"DICM\r\n--7d2c1 almost a boundary \r\n-".to_vec(),
            Vec::new(),
            (0..300_000u32).map(|i| (i % 251) as u8).collect(),
            b"\r\n".to_vec(),
        ];
        let mut body = b"preamble to ignore\r\n".to_vec();
        for (i, p) in parts.iter().enumerate() {
            body.extend_from_slice(format!("--{b}\r\n").as_bytes());
            if i != 1 {
                body.extend_from_slice(b"Content-Type: application/dicom\r\n");
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(p);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        for step in [1, 2, 3, 7, 64, 4096, 1 << 20] {
            let mut sink = Parts::default();
            let n = read_multipart(Trickle(&body, step), b, &mut sink).unwrap();
            assert_eq!(n, parts.len(), "step {step}");
            assert_eq!(sink.0, parts, "step {step}");
        }
        // Without a preamble, the first boundary starts the body.
        let body = format!("--{b}\r\n\r\nabc\r\n--{b}--");
        let mut sink = Parts::default();
        assert_eq!(read_multipart(body.as_bytes(), b, &mut sink).unwrap(), 1);
        assert_eq!(sink.0, vec![b"abc".to_vec()]);
        // Cut off inside a part, or no boundary at all: an error that says so.
        for (bad, why) in [
            (format!("--{b}\r\n\r\nabc"), "ends inside a part"),
            ("no parts here".to_owned(), "no part"),
        ] {
            match read_multipart(bad.as_bytes(), b, &mut Parts::default()) {
                Err(MultipartError::Malformed(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            boundary("multipart/related; type=\"application/dicom\"; boundary=\"abc\""),
            Some("abc".into())
        );
        assert_eq!(boundary("application/dicom+json"), None);
    }

    #[test]
    fn pixel_data_size_is_rows_columns_bits_samples_frames() {
        let item: Value = serde_json::from_str(
            r#"{"00280010":{"vr":"US","Value":[512]},"00280011":{"vr":"US","Value":[512]},
                "00280100":{"vr":"US","Value":[16]},"00280008":{"vr":"IS","Value":["2"]}}"#,
        )
        .unwrap();
        assert_eq!(pixel_bytes(&item), 512 * 512 * 2 * 2);
        assert_eq!(pixel_bytes(&serde_json::json!({})), 0);
    }

    #[test]
    fn secrets_come_from_files_only_others_cannot_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let creds = PacsCredentials::Basic { user: "u".into(), password_file: file.clone() };
        assert_eq!(
            creds.load().unwrap(),
            PacsAuth::Basic { user: "u".into(), password: "s3cret".into() }
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = creds.load().unwrap_err().to_string();
        assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
        let missing = PacsCredentials::Bearer { token_file: dir.path().join("nope") };
        assert!(missing.load().unwrap_err().to_string().contains("nope"));
    }
}
