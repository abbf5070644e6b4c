//! The site's PACS over DICOMweb: QIDO-RS to find and describe series.
//!
//! In Kaapana a dataset is a list of DICOM identifiers held in the platform's PACS (dcm4chee
//! behind DICOMweb). [`DicomWeb::series`] resolves a query (series or study instance UIDs, or
//! attribute matches such as `Modality=CT`) to the series it names, with each series' study,
//! modality and number of instances, from the PACS's `/series` QIDO-RS resource
//! (`application/dicom+json`). Nothing read here is ever sent to a peer: peers see counts and
//! per-peer tokens ([`crate::datasets`]).
//!
//! Not built yet (issue 14): fetching series by WADO-RS into a job's `/input`, PACS datasets
//! in `dataset add`, modality counts in capability ads.

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
    /// A query term is not `KEYWORD=value`.
    #[error("query term `{0}` is not KEYWORD=value (e.g. Modality=CT)")]
    BadQuery(String),
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
}

/// The attributes asked for with every series.
const SERIES_FIELDS: &[&str] = &["0020000D", "00080060", "00201209"];

impl DicomWeb {
    /// The endpoint at `base`.
    pub fn new(base: &str, auth: PacsAuth) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Self { base: base.trim_end_matches('/').to_owned(), auth, agent }
    }

    /// The series `query` names, in the order the PACS lists them, each once.
    pub fn series(&self, query: &SeriesQuery) -> Result<Vec<SeriesInfo>, PacsError> {
        let mut out: Vec<SeriesInfo> = Vec::new();
        let push = |found: Vec<SeriesInfo>, out: &mut Vec<SeriesInfo>| {
            for s in found {
                if !out.iter().any(|o| o.series_uid == s.series_uid) {
                    out.push(s);
                }
            }
        };
        match query {
            SeriesQuery::Series(uids) => {
                for uid in uids {
                    let found = self.qido(&[("SeriesInstanceUID".into(), uid.clone())])?;
                    push(found, &mut out);
                }
            }
            SeriesQuery::Studies(uids) => {
                for uid in uids {
                    let found = self.qido(&[("StudyInstanceUID".into(), uid.clone())])?;
                    push(found, &mut out);
                }
            }
            SeriesQuery::Match(terms) => push(self.qido(terms)?, &mut out),
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
        let mut req = self.agent.get(url).header("Accept", accept);
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
}
