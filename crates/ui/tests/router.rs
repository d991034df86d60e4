//! The UI's router: every embedded file with its type and the security headers, redirects,
//! revalidation, 404s; and the assets' own rules (no inline code, no HTML parsing of data).

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt as _;

async fn call(path: &str, etag: Option<&str>) -> axum::response::Response {
    let mut req = Request::builder().uri(path);
    if let Some(t) = etag {
        req = req.header(header::IF_NONE_MATCH, t);
    }
    ice_ui::router()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

fn header_of(r: &axum::response::Response, name: header::HeaderName) -> &str {
    r.headers()
        .get(&name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

fn secured(r: &axum::response::Response) {
    assert_eq!(
        header_of(r, header::CONTENT_SECURITY_POLICY),
        ice_ui::CONTENT_SECURITY_POLICY
    );
    assert_eq!(header_of(r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    assert_eq!(header_of(r, header::X_FRAME_OPTIONS), "DENY");
    assert_eq!(header_of(r, header::REFERRER_POLICY), "no-referrer");
}

#[tokio::test]
async fn every_asset_is_served_with_its_type_and_the_policy() {
    for a in ice_ui::ASSETS {
        let r = call(&format!("/ui/{}", a.name), None).await;
        assert_eq!(r.status(), StatusCode::OK, "{}", a.name);
        assert_eq!(header_of(&r, header::CONTENT_TYPE), a.content_type);
        assert_eq!(header_of(&r, header::CACHE_CONTROL), "no-cache");
        secured(&r);
        let etag = header_of(&r, header::ETAG).to_string();
        let body = to_bytes(r.into_body(), usize::MAX).await.unwrap();
        assert_eq!(&body[..], a.body, "{}", a.name);
        // A client holding the current copy gets 304 and no body.
        let again = call(&format!("/ui/{}", a.name), Some(&etag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{}", a.name);
        secured(&again);
        let other = call(&format!("/ui/{}", a.name), Some("\"stale\"")).await;
        assert_eq!(other.status(), StatusCode::OK, "{}", a.name);
    }
    let page = call("/ui/", None).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(
        header_of(&page, header::CONTENT_TYPE),
        "text/html; charset=utf-8"
    );
    secured(&page);
    let body = to_bytes(page.into_body(), usize::MAX).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("<script type=\"module\" src=\"app.js\">"));
}

#[tokio::test]
async fn the_root_redirects_and_unknown_files_are_404() {
    for path in ["/", "/ui"] {
        let r = call(path, None).await;
        assert!(r.status().is_redirection(), "{path}: {}", r.status());
        assert_eq!(header_of(&r, header::LOCATION), "/ui/");
        secured(&r);
    }
    for path in ["/ui/nope.js", "/ui/..%2FCargo.toml", "/ui/index.html%00"] {
        let r = call(path, None).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        secured(&r);
    }
    // Deeper paths are not the UI's (a host's fallback answers them).
    let r = call("/ui/a/b", None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[test]
fn the_policy_allows_only_this_origin() {
    let csp = ice_ui::CONTENT_SECURITY_POLICY;
    for must in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(csp.contains(must), "{must} missing from {csp}");
    }
    for never in ["unsafe-inline", "unsafe-eval", "*", "http:", "https:"] {
        assert!(!csp.contains(never), "{never} in {csp}");
    }
}

/// The page's code builds the DOM from text nodes only, and has no inline code (which the
/// policy would block anyway): a check on the files themselves.
#[test]
fn the_assets_never_parse_data_as_html_and_have_no_inline_code() {
    for a in ice_ui::ASSETS {
        let text = std::str::from_utf8(a.body).unwrap();
        for never in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!text.contains(never), "{} uses {never}", a.name);
        }
        if a.name.ends_with(".html") {
            assert!(!text.contains(" style="), "{}: inline style", a.name);
            assert!(!text.contains(" onclick="), "{}: inline handler", a.name);
            for (i, _) in text.match_indices("<script") {
                assert!(
                    text[i..].starts_with("<script type=\"module\" src="),
                    "{}: inline script",
                    a.name
                );
            }
        }
    }
    // Every file the page links to is one the router serves.
    let index = std::str::from_utf8(ice_ui::ASSETS[0].body).unwrap();
    for name in ["style.css", "app.js", "favicon.svg"] {
        assert!(index.contains(name));
    }
    for a in ice_ui::ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        let text = std::str::from_utf8(a.body).unwrap();
        for line in text.lines().filter(|l| l.starts_with("import ")) {
            let from = line.rsplit("from '").next().unwrap();
            let file = from.trim_end_matches("';").trim_start_matches("./");
            assert!(
                ice_ui::ASSETS.iter().any(|x| x.name == file),
                "{} imports {file}, which is not embedded",
                a.name
            );
        }
    }
}
