//! The HTTP adapter: requests reach exactly the authorised parsed host; URL tricks map to the
//! host they really name or are refused; nothing is sent on a refusal; redirects are returned.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ice_authority::{EffectClass, Resource};
use ice_kernel::Digest;

use crate::Authorization;
use crate::auth::testing::{authorize, read};
use crate::http::{
    HttpClient, HttpError, HttpLimits, HttpRequest, UrlError, parse_target, policy_arguments,
};
use crate::{AuthorizationError, Detail};

/// One request as the test server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    host: String,
    body: Vec<u8>,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that answers each connection once and closes it:
/// `/redirect` → 302 to another host; `/big` → 1000 bytes; `/slow` → answers after 3 s;
/// anything else → 200 `hello METHOD BODY`.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<Mutex<usize>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                *c.lock().unwrap() += 1;
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &s);
                });
            }
        });
        Server {
            port,
            seen,
            connections,
        }
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

fn serve(stream: TcpStream, seen: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let (mut length, mut host) = (0usize, String::new());
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "host" => host = value.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        host,
        body: body.clone(),
    });
    let mut stream = stream;
    let (status, extra, payload): (&str, &str, Vec<u8>) = match path.as_str() {
        "/redirect" => (
            "302 Found",
            "Location: http://evil.example/steal\r\n",
            b"moved".to_vec(),
        ),
        "/big" => ("200 OK", "", vec![b'x'; 1000]),
        "/slow" => {
            std::thread::sleep(Duration::from_secs(3));
            ("200 OK", "", b"late".to_vec())
        }
        _ => {
            let mut text = format!("hello {method} ").into_bytes();
            text.extend_from_slice(&body);
            ("200 OK", "", text)
        }
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    stream.write_all(&payload)?;
    stream.flush()
}

fn host_auth(host: &str, effect: EffectClass) -> Authorization {
    authorize("http.request", Resource::host(host).unwrap(), effect)
}

fn get(url: String) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        url,
        headers: vec![],
        body: vec![],
    }
}

fn client() -> HttpClient {
    HttpClient::new(HttpLimits {
        timeout: Duration::from_secs(10),
        max_response_bytes: 1 << 20,
    })
}

fn refused(result: Result<crate::http::HttpResponse, HttpError>) -> AuthorizationError {
    match result {
        Err(HttpError::Refused(e)) => *e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn get_records_status_and_body_digest() {
    let server = Server::start();
    let auth = host_auth("127.0.0.1", EffectClass::Read);
    let response = client()
        .request(&auth, &get(server.url("127.0.0.1", "/hello?x=1#frag")))
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello GET ");
    assert!(!response.body_truncated);
    let evidence = &response.evidence;
    assert_eq!(evidence.effect, EffectClass::Read);
    assert_eq!(evidence.target, Resource::Host("127.0.0.1".into()));
    assert_eq!(evidence.outputs[0].digest, Digest::of(b"hello GET "));
    assert_eq!(evidence.outputs[0].bytes, 10);
    let json = evidence.to_json();
    assert_eq!(json["http"]["status"], 200);
    assert_eq!(json["http"]["method"], "GET");
    assert_eq!(
        json["http"]["url"],
        format!("http://127.0.0.1:{}/hello?x=1", server.port)
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/hello?x=1")
    );
    assert_eq!(seen[0].host, format!("127.0.0.1:{}", server.port));
}

#[test]
fn post_sends_its_body_and_needs_an_external_authorization() {
    let server = Server::start();
    let post = HttpRequest {
        method: "POST".into(),
        url: server.url("127.0.0.1", "/submit"),
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: b"data".to_vec(),
    };
    // A read (GET/HEAD) authorization cannot make a POST.
    let err = refused(client().request(&host_auth("127.0.0.1", EffectClass::Read), &post));
    assert!(matches!(
        err,
        AuthorizationError::Effect {
            needed: EffectClass::External,
            ..
        }
    ));
    assert_eq!(server.connections(), 0);

    let response = client()
        .request(&host_auth("127.0.0.1", EffectClass::External), &post)
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello POST data");
    assert_eq!(response.evidence.effect, EffectClass::External);
    assert_eq!(response.evidence.inputs[0].digest, Digest::of(b"data"));
    assert_eq!(server.seen()[0].body, b"data");
}

#[test]
fn a_mismatched_host_is_refused_before_any_connection() {
    let server = Server::start();
    let c = client();
    let err = refused(c.request(
        &host_auth("allowed.com", EffectClass::External),
        &get(server.url("127.0.0.1", "/")),
    ));
    assert!(matches!(err, AuthorizationError::Mismatch { .. }));
    // A name is not its address: a grant on 127.0.0.1 does not cover localhost.
    refused(c.request(
        &host_auth("127.0.0.1", EffectClass::Read),
        &get(server.url("localhost", "/")),
    ));
    // Another capability on the right host is refused too.
    refused(c.request(&read("127.0.0.1"), &get(server.url("127.0.0.1", "/"))));
    assert_eq!(server.connections(), 0, "the server saw nothing");
    // The same server is reachable with the right authorization.
    c.request(
        &host_auth("127.0.0.1", EffectClass::Read),
        &get(server.url("127.0.0.1", "/")),
    )
    .unwrap();
    assert_eq!(server.connections(), 1);
}

#[test]
fn numeric_and_encoded_forms_of_an_address_contact_that_address() {
    let server = Server::start();
    let auth = host_auth("127.0.0.1", EffectClass::Read);
    let c = client();
    for host in [
        "2130706433",
        "0x7f.1",
        "127.1",
        "0177.0.0.1",
        "%31%32%37.0.0.1",
        "127.0.0.1.",
    ] {
        let url = server.url(host, "/n");
        let target = parse_target(&url).unwrap();
        assert_eq!(target.host(), &Resource::Host("127.0.0.1".into()), "{host}");
        let response = c.request(&auth, &get(url)).unwrap();
        assert_eq!(response.status, 200, "{host}");
    }
    let seen = server.seen();
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().all(|s| s.host.starts_with("127.0.0.1")));
}

#[test]
fn url_tricks_map_to_the_host_they_name_or_are_refused() {
    let ok = |url: &str, host: &str| {
        let target = parse_target(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(target.host(), &Resource::host(host).unwrap(), "{url}");
    };
    let err = |url: &str| parse_target(url).expect_err(url);

    assert!(matches!(
        err("http://allowed.com@evil.com/"),
        UrlError::UserInfo { .. }
    ));
    assert!(matches!(
        err("http://a:b@allowed.com/"),
        UrlError::UserInfo { .. }
    ));
    assert!(matches!(
        err("http://allowed.com:80@evil.com/"),
        UrlError::UserInfo { .. }
    ));
    assert!(matches!(
        err("http://evil.com%2F@allowed.com/"),
        UrlError::UserInfo { .. }
    ));
    ok("http://evil.com#@allowed.com", "evil.com");
    ok("http://evil.com?@allowed.com/", "evil.com");
    ok("http://evil.com\\@allowed.com/", "evil.com");
    ok("http://ALLOWED.com./", "allowed.com");
    ok("HTTP://Allowed.COM/x", "allowed.com");
    ok("http://allowed%2Ecom/", "allowed.com");
    ok("http://%61llowed.com/", "allowed.com");
    ok("http:///allowed.com/", "allowed.com");
    ok("http://[::1]/", "::1");
    ok("http://[0:0:0:0:0:0:0:1]:8080/", "::1");
    ok("http://[::ffff:127.0.0.1]/", "127.0.0.1");
    ok("http://2130706433/", "127.0.0.1");
    ok("http://0x7f.1/", "127.0.0.1");
    ok("http://127.1/", "127.0.0.1");
    ok("https://bücher.example/", "xn--bcher-kva.example");
    assert!(matches!(
        err("http://allowed.com%40evil.com/"),
        UrlError::Parse { .. }
    ));
    assert!(matches!(err("http://1.2.3.4.5/"), UrlError::Parse { .. }));
    assert!(matches!(err("http://foo.0x10/"), UrlError::Parse { .. }));
    assert!(matches!(err("http://[::1/"), UrlError::Parse { .. }));
    assert!(matches!(err("ftp://allowed.com/"), UrlError::Scheme { .. }));
    assert!(matches!(err("file:///etc/passwd"), UrlError::Scheme { .. }));
    assert!(matches!(
        err("javascript:alert(1)"),
        UrlError::Scheme { .. }
    ));
    assert!(matches!(err("//allowed.com/"), UrlError::Parse { .. }));
    // The fragment is not sent.
    assert_eq!(
        parse_target("http://a.example/p#frag")
            .unwrap()
            .url()
            .as_str(),
        "http://a.example/p"
    );
}

/// What a policy sees of a URL is the parse that is sent: dot segments (plain, percent-encoded,
/// behind backslashes) are resolved before a policy reads `url` or `path`, and the server gets
/// exactly that path, never the agent's text.
#[test]
fn a_policy_sees_the_url_that_is_sent() {
    let server = Server::start();
    let auth = host_auth("127.0.0.1", EffectClass::Read);
    let c = client();
    let base = format!("http://127.0.0.1:{}", server.port);
    for given in [
        "/repos/me/../../admin",
        "/repos/me/%2e%2e/%2E%2E/admin",
        "/repos/me/.%2e/%2e./admin",
        "/repos/me\\..\\..\\admin",
        "/repos/./me/../../admin#/repos/me/x",
    ] {
        let url = format!("{base}{given}");
        let target = parse_target(&url).unwrap();
        assert_eq!(target.given(), url);
        assert_eq!(target.as_str(), format!("{base}/admin"), "{given}");
        let args = policy_arguments(&target, &serde_json::json!({}));
        assert_eq!(args["url"], format!("{base}/admin"), "{given}");
        assert_eq!(args["path"], "/admin", "{given}");
        // Sent as it was decided on: the adapter does not parse the agent's text again.
        let response = c.send(&auth, &target, "GET", &[], &[]).unwrap();
        assert_eq!(response.status, 200);
        match &response.evidence.detail {
            Detail::Http { url, .. } => assert_eq!(url, target.as_str()),
            other => panic!("{other:?}"),
        }
    }
    let seen = server.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| s.path == "/admin"), "{seen:?}");
}

/// One spelling per path and query: an escaped unreserved character is decoded (a server reads
/// `/%61dmin` as `/admin`, so a policy on `/admin` must see it as that), every other escape is
/// written in upper case, and the server gets exactly that spelling.
#[test]
fn escapes_have_one_spelling() {
    let server = Server::start();
    let auth = host_auth("127.0.0.1", EffectClass::Read);
    let c = client();
    let base = format!("http://127.0.0.1:{}", server.port);
    for (given, path, query) in [
        ("/%61dmin", "/admin", ""),
        ("/%41%44%4d%49%4E/%7e%2d%2E%5f", "/ADMIN/~-._", ""),
        ("/a%2fb%5cc", "/a%2Fb%5Cc", ""),
        ("/a/%2E%2E%2Fb", "/a/..%2Fb", ""),
        ("/a/%2e%2E%2e", "/a/...", ""),
        ("/caf%c3%a9", "/caf%C3%A9", ""),
        ("/q?role=%61dmin&to=%2f%3d", "/q", "role=admin&to=%2F%3D"),
    ] {
        let target = parse_target(&format!("{base}{given}")).unwrap();
        let args = policy_arguments(&target, &serde_json::json!({}));
        assert_eq!(args["path"], path, "{given}");
        assert_eq!(args["query"], query, "{given}");
        let sent = if query.is_empty() {
            format!("{base}{path}")
        } else {
            format!("{base}{path}?{query}")
        };
        assert_eq!(target.as_str(), sent, "{given}");
        assert_eq!(args["url"], sent, "{given}");
        // Parsing the spelling again changes nothing.
        assert_eq!(parse_target(&sent).unwrap().as_str(), sent, "{given}");
        let response = c.send(&auth, &target, "GET", &[], &[]).unwrap();
        assert_eq!(response.status, 200, "{given}");
    }
    // A `%` that does not start an escape is refused: decoding what follows could make it one.
    for given in [
        "/%6%31dmin",
        "/v1/deploy/..%2%66admin",
        "/x%zz",
        "/x%4",
        "/y%",
        "/q?to=%",
        "/q?to=%%32F",
    ] {
        match parse_target(&format!("{base}{given}")) {
            Err(UrlError::Parse { problem, .. }) => {
                assert!(
                    problem.contains("not followed by two hex digits"),
                    "{given}: {problem}"
                )
            }
            other => panic!("{given}: {other:?}"),
        }
    }
    // An overlong UTF-8 sequence in the path is refused, in either case of its hex digits: an
    // old server reads `%C0%AE` as `.`, so `/v1/deploy/%C0%AE%C0%AE/admin` would be `/admin`.
    for (given, seq) in [
        ("/v1/deploy/%C0%AE%C0%AE/admin", "%C0%AE"),
        ("/v1/deploy/%c0%ae%c0%ae/admin", "%C0%AE"),
        ("/a%C1%9Cb", "%C1%9C"),
        ("/a%e0%80%aeb", "%E0%80"),
        ("/a%E0%9F%BFb", "%E0%9F"),
        ("/a%F0%80%80%AEb", "%F0%80"),
        ("/end%C0", "%C0"),
    ] {
        match parse_target(&format!("{base}{given}")) {
            Err(UrlError::Parse { problem, .. }) => {
                assert!(
                    problem.contains("overlong UTF-8") && problem.contains(&format!("`{seq}`")),
                    "{given}: {problem}"
                )
            }
            other => panic!("{given}: {other:?}"),
        }
    }
    // Well-formed multi-byte characters, and any escaped bytes in a query, are not overlong.
    for given in [
        "/caf%C3%A9/%E0%A4%85/%F0%9F%98%80",
        "/a%E0%A0%80b",
        "/a%F0%90%80%80b",
        "/announce?info_hash=%C0%AE%E0%80%F0%8F",
    ] {
        assert!(parse_target(&format!("{base}{given}")).is_ok(), "{given}");
    }
    let seen: Vec<String> = server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        seen,
        [
            "/admin",
            "/ADMIN/~-._",
            "/a%2Fb%5Cc",
            "/a/..%2Fb",
            "/a/...",
            "/caf%C3%A9",
            "/q?role=admin&to=%2F%3D"
        ]
    );
}

/// Every field of `context.arguments` for an HTTP call comes from the parse, as the schema
/// declares it: the effective port (explicit, else the scheme's), the path and query as sent,
/// the method in upper case (GET when absent).
#[test]
fn policy_arguments_are_derived_from_the_parse() {
    let args =
        |url: &str, call: serde_json::Value| policy_arguments(&parse_target(url).unwrap(), &call);
    assert_eq!(
        args(
            "HTTPS://API.Example.com./v1/a/../b?x=1&y=%20#frag",
            serde_json::json!({"method": "post", "body": "{}"})
        ),
        serde_json::json!({
            "method": "POST",
            "url": "https://api.example.com/v1/b?x=1&y=%20",
            "scheme": "https",
            "host": "api.example.com",
            "port": 443,
            "path": "/v1/b",
            "query": "x=1&y=%20",
        })
    );
    let a = args("http://api.example.com", serde_json::json!({}));
    assert_eq!(
        (&a["method"], &a["port"], &a["path"], &a["query"]),
        (&"GET".into(), &80.into(), &"/".into(), &"".into())
    );
    // An explicit port, even the default one (which the serialisation drops).
    let a = args("https://api.example.com:8443/", serde_json::json!({}));
    assert_eq!(a["port"], 8443);
    let a = args("https://api.example.com:443/", serde_json::json!({}));
    assert_eq!(
        (&a["port"], &a["url"]),
        (&443.into(), &"https://api.example.com/".into())
    );
    // IPv6 hosts as the resource names them (no brackets), brackets kept in the URL.
    let a = args("http://[::1]:8080/x", serde_json::json!({}));
    assert_eq!(
        (&a["host"], &a["url"]),
        (&"::1".into(), &"http://[::1]:8080/x".into())
    );
}

/// An IPv6 address that embeds an IPv4 address is named, checked and contacted as that IPv4
/// address: `[::ffff:127.0.0.1]` is `Host::"127.0.0.1"`, and the URL sent says 127.0.0.1.
#[test]
fn an_ipv4_mapped_address_is_its_ipv4_address() {
    let server = Server::start();
    for host in [
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
    ] {
        let url = server.url(host, "/m");
        let target = parse_target(&url).unwrap();
        assert_eq!(target.host(), &Resource::Host("127.0.0.1".into()), "{host}");
        assert_eq!(target.as_str(), server.url("127.0.0.1", "/m"), "{host}");
        let args = policy_arguments(&target, &serde_json::json!({}));
        assert_eq!(args["host"], "127.0.0.1");
        // An authorization on the IPv4 host covers it; one on another host does not.
        let response = client()
            .request(
                &host_auth("127.0.0.1", EffectClass::Read),
                &get(url.clone()),
            )
            .unwrap();
        assert_eq!(response.status, 200);
        let e = refused(client().request(&host_auth("::1", EffectClass::Read), &get(url)));
        assert!(matches!(e, AuthorizationError::Mismatch { .. }), "{e:?}");
    }
    assert_eq!(server.seen().len(), 3);
    // Loopback and unspecified IPv6 stay themselves.
    assert_eq!(
        parse_target("http://[::1]/").unwrap().host(),
        &Resource::Host("::1".into())
    );
    assert_eq!(
        parse_target("http://[::]/").unwrap().host(),
        &Resource::Host("::".into())
    );
}

#[test]
fn a_redirect_is_returned_not_followed() {
    let server = Server::start();
    let response = client()
        .request(
            &host_auth("127.0.0.1", EffectClass::Read),
            &get(server.url("127.0.0.1", "/redirect")),
        )
        .unwrap();
    assert_eq!(response.status, 302);
    assert_eq!(response.body, b"moved");
    match &response.evidence.detail {
        Detail::Http { location, .. } => {
            assert_eq!(location.as_deref(), Some("http://evil.example/steal"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn the_body_is_cut_at_the_limit_and_a_slow_server_times_out() {
    let server = Server::start();
    let auth = host_auth("127.0.0.1", EffectClass::Read);
    let small = HttpClient::new(HttpLimits {
        timeout: Duration::from_millis(500),
        max_response_bytes: 100,
    });
    let response = small
        .request(&auth, &get(server.url("127.0.0.1", "/big")))
        .unwrap();
    assert_eq!(response.body.len(), 100);
    assert!(response.body_truncated);
    assert_eq!(response.evidence.to_json()["http"]["body_truncated"], true);
    let started = std::time::Instant::now();
    let err = small
        .request(&auth, &get(server.url("127.0.0.1", "/slow")))
        .unwrap_err();
    // Connected, sent, and no answer in time: a timeout after the request went out, with the
    // request's evidence (where it went, what was sent, no status).
    let HttpError::Unanswered { error, evidence } = &err else {
        panic!("{err:?}")
    };
    assert!(matches!(**error, HttpError::Timeout { .. }), "{err:?}");
    let http = &evidence.to_json()["http"];
    assert_eq!(http["status"], serde_json::Value::Null, "{http}");
    assert_eq!(
        http["addresses"],
        serde_json::json!(["127.0.0.1"]),
        "{http}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // No connection made (nothing listens): nothing was sent, a plain transport failure.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = small
        .request(&auth, &get(format!("http://127.0.0.1:{port}/x")))
        .unwrap_err();
    assert!(matches!(err, HttpError::Transport { .. }), "{err:?}");
}

#[test]
fn requests_the_adapter_does_not_send() {
    let server = Server::start();
    let auth = host_auth("127.0.0.1", EffectClass::External);
    let c = client();
    let with = |method: &str, headers: Vec<(String, String)>, body: &[u8]| HttpRequest {
        method: method.into(),
        url: server.url("127.0.0.1", "/"),
        headers,
        body: body.to_vec(),
    };
    for request in [
        with("GET", vec![("Host".into(), "allowed.com".into())], b""),
        with("POST", vec![("content-length".into(), "1".into())], b"xy"),
        with("GET", vec![("Proxy-Authorization".into(), "x".into())], b""),
        with("GET", vec![], b"body"),
        with("CONNECT", vec![], b""),
        with("get", vec![], b""),
        with("GET", vec![("X-Bad".into(), "a\r\nb".into())], b""),
    ] {
        let result = c.request(&auth, &request);
        assert!(
            matches!(result, Err(HttpError::Request(_))),
            "{request:?}: {result:?}"
        );
    }
    assert_eq!(server.connections(), 0);
}

#[test]
fn a_grants_constraints_tighten_the_clients_limits() {
    use crate::auth::testing::constrained;
    let server = Server::start();
    let bounded = |max_bytes, timeout_ms| {
        constrained(
            "http.request",
            Resource::host("127.0.0.1").unwrap(),
            EffectClass::External,
            ice_authority::Constraints {
                max_bytes,
                timeout_ms,
            },
        )
    };
    // A body over max_bytes is refused before any connection.
    let post = |body: &[u8]| HttpRequest {
        method: "POST".into(),
        url: server.url("127.0.0.1", "/submit"),
        headers: vec![],
        body: body.to_vec(),
    };
    let err = refused(client().request(&bounded(Some(4), None), &post(b"12345")));
    assert!(
        matches!(
            &err,
            AuthorizationError::Constraint {
                constraint: "max_bytes",
                limit: 4,
                bytes: 5,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("at most 4 bytes per use (max_bytes)"),
        "{err}"
    );
    assert_eq!(server.connections(), 0);
    // The response gets what the body left: 10 - 4 = 6 of "hello POST data".
    let response = client()
        .request(&bounded(Some(10), None), &post(b"data"))
        .unwrap();
    assert_eq!(response.body, b"hello ");
    assert!(response.body_truncated);
    // A generous constraint leaves the client's own limit in force.
    let small = HttpClient::new(HttpLimits {
        timeout: Duration::from_secs(10),
        max_response_bytes: 100,
    });
    let response = small
        .request(
            &bounded(Some(1 << 20), None),
            &get(server.url("127.0.0.1", "/big")),
        )
        .unwrap();
    assert_eq!(response.body.len(), 100);
    // timeout_ms cuts a request the client alone would have waited 10 s for.
    let started = std::time::Instant::now();
    let err = client()
        .request(
            &bounded(None, Some(300)),
            &get(server.url("127.0.0.1", "/slow")),
        )
        .unwrap_err();
    assert!(
        matches!(&err, HttpError::Unanswered { error, .. }
            if matches!(**error, HttpError::Timeout { timeout, .. } if timeout == Duration::from_millis(300))),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn an_address_the_admission_check_refuses_is_never_contacted() {
    let server = Server::start();
    let limits = HttpLimits {
        timeout: Duration::from_secs(10),
        max_response_bytes: 1 << 20,
    };
    let asked = std::sync::Arc::new(Mutex::new(Vec::new()));
    let a = asked.clone();
    let refusing = HttpClient::with_admission(
        limits,
        std::sync::Arc::new(move |ip: std::net::IpAddr| {
            a.lock().unwrap().push(ip);
            if ip.is_loopback() {
                Err("loopback is off limits".to_string())
            } else {
                Ok(())
            }
        }),
    );
    for host in ["localhost", "127.0.0.1"] {
        let auth = host_auth(host, EffectClass::Read);
        match refusing.request(&auth, &get(server.url(host, "/x"))) {
            Err(HttpError::AddressRefused {
                host: h,
                address,
                why,
            }) => {
                assert_eq!(h, host);
                assert!(address.is_loopback(), "{address}");
                assert_eq!(why, "loopback is off limits");
            }
            other => panic!("{host}: expected a refused address, got {other:?}"),
        }
    }
    assert!(!asked.lock().unwrap().is_empty());
    assert_eq!(server.connections(), 0, "a refused address was contacted");
    // An admitting check changes nothing; the name is resolved, and the address checked,
    // exactly once per request (the same client, twice).
    let checks = std::sync::Arc::new(Mutex::new(0));
    let c = checks.clone();
    let admitting = HttpClient::with_admission(
        limits,
        std::sync::Arc::new(move |_: std::net::IpAddr| {
            *c.lock().unwrap() += 1;
            Ok(())
        }),
    );
    let auth = host_auth("127.0.0.1", EffectClass::Read);
    let mut response = None;
    for n in 1..=2 {
        let r = admitting
            .request(&auth, &get(server.url("127.0.0.1", "/y")))
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(*checks.lock().unwrap(), n);
        response = Some(r);
    }
    let response = response.unwrap();
    // The evidence names the address contacted.
    assert_eq!(
        response.evidence.to_json()["http"]["addresses"],
        serde_json::json!(["127.0.0.1"])
    );
    assert_eq!(server.connections(), 2);
}
