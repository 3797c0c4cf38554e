//! Plain HTTP/1.0 to local servers (probes, metrics, etcd, Jaeger's query API): no TLS, one
//! request per connection, the answer read until the server closes it.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Sends `method path` (with a JSON `body`, if any) to `host` (`address:port`); returns the status
/// and the body.
pub fn request(host: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let addr = host.to_socket_addrs()?.next().with_context(|| format!("cannot resolve {host}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n")?;
    if let Some(b) = body {
        write!(s, "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())?;
    } else {
        write!(s, "\r\n")?;
    }
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// GET `path` from 127.0.0.1:`port`.
pub fn get(port: u16, path: &str) -> Result<(u16, String)> {
    request(&format!("127.0.0.1:{port}"), "GET", path, None)
}

/// POST a JSON `body` to `path` on 127.0.0.1:`port`.
pub fn post(port: u16, path: &str, body: &str) -> Result<(u16, String)> {
    request(&format!("127.0.0.1:{port}"), "POST", path, Some(body))
}

/// Percent-encodes `s` for a URL query value (everything but unreserved characters).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET an `http://host:port/path` URL; None when it cannot be fetched.
pub fn get_url(url: &str) -> Option<(u16, String)> {
    let (host, path) = split_url(url)?;
    request(host, "GET", &path, None).ok()
}

/// The host and the path (with its query) of an `http://` URL.
fn split_url(url: &str) -> Option<(&str, String)> {
    let rest = url.strip_prefix("http://")?;
    Some(rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:16686/api/traces?x=1"),
            Some(("127.0.0.1:16686", "/api/traces?x=1".into()))
        );
        assert_eq!(split_url("http://127.0.0.1:16686"), Some(("127.0.0.1:16686", "/".into())));
        assert_eq!(split_url("https://127.0.0.1"), None);
    }

    #[test]
    fn a_get_and_a_post_round_trip() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = listener.accept().expect("accept");
                // The request arrives in pieces: read until its head and its `{}` body are in.
                let mut got = String::new();
                while !(got.ends_with("\r\n\r\n") && got.starts_with("GET") || got.ends_with("{}")) {
                    let mut buf = [0u8; 4096];
                    let n = c.read(&mut buf).expect("read");
                    assert!(n > 0, "the client closed early: {got:?}");
                    got.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                seen.push(got);
                c.write_all(b"HTTP/1.0 201 Created\r\nContent-Type: text/plain\r\n\r\nhello").expect("write");
            }
            seen
        });
        assert_eq!(get(port, "/readyz").expect("get"), (201, "hello".into()));
        assert_eq!(post(port, "/v3/kv/range", "{}").expect("post").0, 201);
        let seen = server.join().expect("server");
        assert!(seen[0].starts_with("GET /readyz HTTP/1.0\r\n"), "{}", seen[0]);
        assert!(
            seen[1].starts_with("POST /v3/kv/range HTTP/1.0\r\n") && seen[1].ends_with("\r\n\r\n{}"),
            "{}",
            seen[1]
        );
    }
}
