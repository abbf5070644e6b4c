//! Who may use the dashboard: a login with the node's API token opens a session, kept in a
//! `SameSite=Strict`, `HttpOnly` cookie; every state-changing request must also carry the
//! session's CSRF token (a hidden form field) and come from this origin.
//!
//! Why both: `SameSite` does not separate two ports of one host (a page served on another
//! port of `localhost` is *same-site*, and its forms would carry the cookie), so the CSRF
//! token is what refuses such a request. `Origin` and `Sec-Fetch-Site` are checked too when
//! the browser sends them.
//!
//! Sessions live in memory: a restart of the daemon logs everyone out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

/// The session cookie's name.
pub const COOKIE: &str = "kaapana_node_session";
/// How long a session lasts without a new login.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The largest form body accepted (bundles and workflow files are far smaller).
pub const MAX_FORM_BYTES: usize = 4 << 20;
/// Sessions kept at once (the oldest go first).
const MAX_SESSIONS: usize = 1_000;

/// One logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    /// The token every form of this session carries.
    pub csrf: String,
    expires: Instant,
}

/// The API token and the open sessions.
#[derive(Debug)]
pub struct Sessions {
    token: String,
    open: Mutex<HashMap<String, Session>>,
}

/// Constant time in the lengths.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Sessions {
    /// Sessions opened with `token`.
    pub fn new(token: String) -> Self {
        Self { token, open: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a session if `given` is the API token: its cookie value.
    pub fn login(&self, given: &str) -> Option<String> {
        if !same_secret(given.trim(), &self.token) {
            return None;
        }
        let id = random_hex()?;
        let csrf = random_hex()?;
        let now = Instant::now();
        let mut open = self.lock();
        open.retain(|_, s| s.expires > now);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        open.insert(id.clone(), Session { csrf, expires: now + SESSION_LIFETIME });
        Some(id)
    }

    /// The live session of a request's cookie.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let open = self.lock();
        // Compared by hash lookup: the id is 256 random bits, not guessable by timing.
        open.get(&id).filter(|s| s.expires > Instant::now()).cloned()
    }

    /// Closes the session of a request's cookie.
    pub fn logout(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.lock().remove(&id);
        }
    }
}

/// A cookie's value from the `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The `Set-Cookie` value that opens a session; `Secure` when the page was reached over
/// HTTPS (through Kaapana's ingress, which says so in `X-Forwarded-Proto`).
pub fn session_cookie(id: &str, headers: &HeaderMap) -> String {
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Why a request from the browser is refused before it reaches its page.
#[derive(Debug)]
pub enum Refusal {
    /// No session: log in first.
    LoginFirst {
        /// Where to come back to after the login (a `/ui` path), for pages.
        next: Option<String>,
    },
    /// A state-changing request from elsewhere or without this session's CSRF token.
    Forbidden(&'static str),
    /// The form is too large or unreadable.
    BadForm(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::LoginFirst { next: Some(next) } => {
                let to = format!("/login?next={}", urlencode(&next));
                Redirect::to(&to).into_response()
            }
            Self::LoginFirst { next: None } => {
                (StatusCode::UNAUTHORIZED, "log in first: the session is missing or has expired")
                    .into_response()
            }
            Self::Forbidden(why) => (StatusCode::FORBIDDEN, why).into_response(),
            Self::BadForm(why) => (StatusCode::BAD_REQUEST, why).into_response(),
        }
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether the request comes from a page of this origin, as far as the browser tells:
/// `Sec-Fetch-Site` (when sent) must be `same-origin` or `none` (typed in, bookmarks), and
/// `Origin` (when sent) must be this host.
pub fn from_this_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return Err("refused: the request came from another site or port (Sec-Fetch-Site)");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        // The host the browser addressed: `Host`, or the one a reverse proxy (Kaapana's
        // ingress) forwarded. A page of another origin cannot set these headers on a form
        // post, and a script of another origin only after a CORS preflight, which this
        // server never grants.
        let hosts = [header::HOST.as_str(), "x-forwarded-host"]
            .into_iter()
            .filter_map(|h| headers.get(h).and_then(|v| v.to_str().ok()))
            .filter(|h| !h.is_empty());
        let same = hosts
            .into_iter()
            .any(|h| origin == format!("http://{h}") || origin == format!("https://{h}"));
        if !same {
            return Err("refused: the request came from another origin (Origin)");
        }
    }
    Ok(())
}

/// The middleware of every `/ui` route: a session is required; a request that changes
/// something (anything but GET and HEAD) must come from this origin and carry the session's
/// CSRF token in its form's `csrf` field. The session is passed on as a request extension.
pub async fn require_session(
    State(sessions): State<Arc<Sessions>>,
    request: Request,
    next: Next,
) -> Result<Response, Refusal> {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    let Some(session) = sessions.session(request.headers()) else {
        let wants_page = safe
            && request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
        let next = wants_page.then(|| {
            request.uri().path_and_query().map_or("/ui/workflows", |p| p.as_str()).to_owned()
        });
        return Err(Refusal::LoginFirst { next });
    };
    let mut request = request;
    if !safe {
        from_this_origin(request.headers()).map_err(Refusal::Forbidden)?;
        let (parts, body) = request.into_parts();
        let bytes = to_bytes(body, MAX_FORM_BYTES)
            .await
            .map_err(|e| Refusal::BadForm(format!("the form cannot be read: {e}")))?;
        let given = form_field(&bytes, "csrf").unwrap_or_default();
        if !same_secret(&given, &session.csrf) {
            return Err(Refusal::Forbidden(
                "refused: the form does not carry this session's CSRF token (reload the page and try again)",
            ));
        }
        request = Request::from_parts(parts, Body::from(bytes));
    }
    request.extensions_mut().insert(session);
    Ok(next.run(request).await)
}

/// One field of an `application/x-www-form-urlencoded` body.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_session_opens_only_with_the_token_and_closes_at_logout() {
        let s = Sessions::new("secret-token".into());
        assert!(s.login("wrong").is_none());
        assert!(s.login("secret-tokenX").is_none());
        let id = s.login("secret-token\n").unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&format!("a=b; {COOKIE}={id}")).unwrap());
        let session = s.session(&h).unwrap();
        assert_eq!(session.csrf.len(), 64);
        assert_ne!(session.csrf, id);
        s.logout(&h);
        assert!(s.session(&h).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_and_strictly_same_site() {
        let c = session_cookie("abc", &HeaderMap::new());
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(session_cookie("abc", &h).ends_with("; Secure"));
    }

    #[test]
    fn requests_from_other_origins_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(from_this_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(from_this_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:9999"));
        assert!(from_this_origin(&h).is_err());
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(from_this_origin(&h).is_err());
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(from_this_origin(&h).is_ok());
        // Behind Kaapana's ingress: the browser's origin is the ingress host.
        h.insert(header::ORIGIN, HeaderValue::from_static("https://kaapana.example.org"));
        assert!(from_this_origin(&h).is_err());
        h.insert("x-forwarded-host", HeaderValue::from_static("kaapana.example.org"));
        assert!(from_this_origin(&h).is_ok());
        h.remove(header::HOST);
        h.remove("x-forwarded-host");
        assert!(from_this_origin(&h).is_err(), "no host to compare with");
    }

    #[test]
    fn form_fields_are_decoded() {
        let body = b"a=1&csrf=ab%2Fc+d&empty=";
        assert_eq!(form_field(body, "csrf").as_deref(), Some("ab/c d"));
        assert_eq!(form_field(body, "empty").as_deref(), Some(""));
        assert!(form_field(body, "nope").is_none());
        assert_eq!(urlencode("/ui/w?a=b c"), "/ui/w%3Fa%3Db%20c");
    }
}
