//! # ice-ui: the operator web UI (interfaces layer)
//!
//! A single page for operators, served by `ice serve` at `/ui/` beside the operator API: runs
//! with their state, cost against budget and effects; a run's timeline, live; the causal graph
//! of an event (what proposed it, what decided it, what authorised it); pending approvals with
//! the exact request, to approve or deny; the run's staged diff; and, in the header, whether
//! the log verifies and its latest signed checkpoint. Payload fields the log keeps as blobs are
//! fetched (`/api/v1/blobs/{digest}`, cached by digest) where they are shown: a pending
//! approval's arguments (Approve waits until the whole call is shown), a staged write's
//! content, the inspected event's fields, a run's budget from a spec kept as a blob.
//!
//! - **No build step.** Plain HTML, CSS and JavaScript modules (no framework, no bundler) in
//!   `crates/ui/assets/`, compiled into the binary with `include_bytes!`: what the repository
//!   holds is what the browser runs.
//! - **No data, no secrets here.** The router serves only those static files, so it needs no
//!   authentication of its own. Every datum the page shows comes from the operator API
//!   (`/api/v1`) with the operator's bearer token, which the page asks for once and keeps in the
//!   tab's `sessionStorage`; the API decides what the token may see and do, and records each
//!   action as the operator's.
//! - **Strict by default.** Every response carries a Content-Security-Policy that allows only
//!   this origin's own scripts, styles and connections (no inline code, no other origin, no
//!   framing) and requires Trusted Types, so no string can reach `innerHTML`: the page builds
//!   its DOM with text nodes only. Plus `nosniff`, `no-referrer`, and validators (`ETag`,
//!   `Cache-Control: no-cache`) so a new binary's files are picked up at once.

#![warn(missing_docs)]

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::Digest as _;

/// Where the UI is mounted (`/` redirects here).
pub const UI_PATH: &str = "/ui/";

/// The Content-Security-Policy of every UI response: this origin's scripts, styles, images and
/// connections only; nothing inline, no plugins, no framing, no `<base>`, and Trusted Types
/// required for every DOM sink that parses HTML or runs script (the page uses none).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; manifest-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'; \
     require-trusted-types-for 'script'; trusted-types 'none'";

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its name under [`UI_PATH`].
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the UI serves (`index.html` is also served at [`UI_PATH`] itself).
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../assets/index.html"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/style.css"),
    },
    Asset {
        name: "app.js",
        content_type: JS,
        body: include_bytes!("../assets/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: JS,
        body: include_bytes!("../assets/api.js"),
    },
    Asset {
        name: "dom.js",
        content_type: JS,
        body: include_bytes!("../assets/dom.js"),
    },
    Asset {
        name: "events.js",
        content_type: JS,
        body: include_bytes!("../assets/events.js"),
    },
    Asset {
        name: "runs.js",
        content_type: JS,
        body: include_bytes!("../assets/runs.js"),
    },
    Asset {
        name: "run.js",
        content_type: JS,
        body: include_bytes!("../assets/run.js"),
    },
    Asset {
        name: "approvals.js",
        content_type: JS,
        body: include_bytes!("../assets/approvals.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../assets/favicon.svg"),
    },
];

/// Each asset's entity tag: the first 16 bytes of its SHA-256, quoted.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let d = sha2::Sha256::digest(a.body);
            HeaderValue::from_str(&format!("\"{}\"", hex::encode(&d[..16])))
                .expect("hex is a valid header value")
        })
        .collect()
});

/// The UI's router: `GET /` and `GET /ui` redirect to [`UI_PATH`], which serves the page;
/// `GET /ui/{asset}` serves the other files. No fallback, so a host can merge it with a router
/// that has one (the operator API's JSON 404).
pub fn router() -> Router {
    Router::new()
        .route("/", get(to_ui))
        .route("/ui", get(to_ui))
        .route(UI_PATH, get(index))
        .route("/ui/{asset}", get(asset))
}

async fn to_ui() -> Response {
    with_policy(Redirect::to(UI_PATH).into_response())
}

async fn index(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.name == name) {
        Some(i) => serve(i, &headers),
        None => {
            let mut r = (
                StatusCode::NOT_FOUND,
                "no such file in ICE's web UI; the page is at /ui/\n",
            )
                .into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            with_policy(r)
        }
    }
}

/// Asset `i`, or 304 when the client's copy is current.
fn serve(i: usize, headers: &HeaderMap) -> Response {
    let a = &ASSETS[i];
    let etag = &ETAGS[i];
    let current = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/").as_bytes() == etag.as_bytes()
        });
    let mut r = if current {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = a.body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(a.content_type),
        );
        r
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_policy(r)
}

/// The security headers every UI response carries.
fn with_policy(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    r
}
