//! `/_mock/fail`: the switch that makes the whole mock process fail, set between calls by a test, so that one of
//! several upstreams fails while the others answer (see the module docs of [`super`]).

use super::MockState;
use super::controls::openai_error;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The longest a call hangs before its headers when nothing turns `hang_headers` off.
const LONGEST_HANG: Duration = Duration::from_secs(600);

/// What the switch is set to: the body of `POST /_mock/fail`, which replaces the previous setting (`{}`: off).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Failing {
    /// Every call answers this status (400 to 599) at once, with OpenAI's error body.
    pub status: Option<u16>,
    /// Every call sends no headers until this is turned off (then it answers `status`, if set, or normally).
    pub hang_headers: bool,
    /// Only the next this many calls fail (or hang); then the switch is off. `None`: until turned off.
    pub times: Option<u32>,
    /// The error's message, instead of the mock's own.
    pub message: Option<String>,
}

impl Failing {
    fn is_on(&self) -> bool {
        self.status.is_some() || self.hang_headers
    }

    fn check(&self) -> Result<(), String> {
        if let Some(status) = self.status
            && !(400..=599).contains(&status)
        {
            return Err(format!("status must be an error status, 400 to 599, not {status}"));
        }
        if self.times == Some(0) {
            return Err("times must be at least 1 (leave it out: until turned off)".to_owned());
        }
        Ok(())
    }
}

/// The switch, and the hanging calls waiting for `hang_headers` to be turned off.
#[derive(Default)]
pub(super) struct Switch {
    failing: parking_lot::Mutex<Failing>,
    /// Bumped whenever a `POST /_mock/fail` turns `hang_headers` off: the hanging calls go on.
    released: tokio::sync::watch::Sender<u64>,
}

impl Switch {
    /// What the switch does to a call that just arrived: hangs it until released (or [`LONGEST_HANG`]), and
    /// answers the error of `status`. `None`: the call goes on to its answer. Takes one of `times`.
    pub(super) async fn fault(&self) -> Option<Response> {
        let (status, message, released) = {
            let mut failing = self.failing.lock();
            if !failing.is_on() {
                return None;
            }
            let taken = failing.clone();
            if let Some(times) = failing.times.as_mut() {
                *times = times.saturating_sub(1);
                if *times == 0 {
                    *failing = Failing::default();
                }
            }
            // Subscribed under the lock, so that no release between this check and the wait is missed.
            (taken.status, taken.message, taken.hang_headers.then(|| self.released.subscribe()))
        };
        if let Some(mut released) = released {
            let _ = tokio::time::timeout(LONGEST_HANG, released.changed()).await;
        }
        let status = StatusCode::from_u16(status?).ok()?;
        let message =
            message.unwrap_or_else(|| format!("Mock failure: status {} (POST /_mock/fail).", status.as_u16()));
        let mut response = openai_error(status, &message);
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("0"));
        }
        Some(response)
    }

    /// Sets the switch; a setting without `hang_headers` lets the hanging calls go on.
    fn set(&self, new: Failing) {
        let mut failing = self.failing.lock();
        let release = !new.hang_headers;
        *failing = new;
        if release {
            self.released.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn get(&self) -> Failing {
        self.failing.lock().clone()
    }
}

/// `POST /_mock/fail`: sets the switch and answers what it is set to now; a body that is not a setting is a 400.
pub(super) async fn set(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body };
    let new = match serde_json::from_slice::<Failing>(body) {
        Ok(new) => new,
        Err(e) => return openai_error(StatusCode::BAD_REQUEST, &format!("Not a setting of /_mock/fail: {e}")),
    };
    if let Err(e) = new.check() {
        return openai_error(StatusCode::BAD_REQUEST, &e);
    }
    state.switch.set(new);
    Json(state.switch.get()).into_response()
}

/// `GET /_mock/fail`: what the switch is set to now (`times`: the calls left to fail).
pub(super) async fn get(State(state): State<Arc<MockState>>) -> Json<Failing> {
    Json(state.switch.get())
}
