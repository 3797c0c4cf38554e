//! A TCP proxy per replica, between it and the API server, that can cut it off or slow it down.
//!
//! While partitioned, the proxy forwards nothing in either direction on open connections and
//! accepts new ones without forwarding, like an `iptables DROP`: the replica sees requests hang
//! until its own timeouts fire, not a clean refusal. On heal, held connections are closed (as a
//! real network's state would have been lost) and new ones flow again.
//!
//! While slowed, every chunk the replica sends waits a random delay in the configured range
//! before it is forwarded (in order: a connection's later bytes wait behind its earlier ones), so
//! each API call takes that much longer; what the API server sends back (watch events too) is not
//! delayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; dropping it stops listening.
pub struct Proxy {
    /// Where replicas connect.
    pub listen: SocketAddr,
    partitioned: watch::Sender<bool>,
    latency: watch::Sender<Option<(Duration, Duration)>>,
    task: tokio::task::JoinHandle<()>,
}

/// A delay in `range`, from a per-connection xorshift state (no dependency on a random crate;
/// the spread, not its quality, is what matters here).
fn pick(range: (Duration, Duration), state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let span = range.1.saturating_sub(range.0);
    range.0 + span.mul_f64((*state % 10_000) as f64 / 10_000.0)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
    latency: Option<watch::Receiver<Option<(Duration, Duration)>>>,
    mut seed: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *cut.borrow() {
            // Hold the bytes: wait for heal, then drop the connection.
            let _ = cut.wait_for(|c| !*c).await;
            return;
        }
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = latency.as_ref().and_then(|l| *l.borrow()).map(|r| pick(r, &mut seed));
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    if *cut.borrow() {
                        let _ = cut.wait_for(|c| !*c).await;
                        return;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = cut.changed() => {}
        }
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (an ephemeral port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let listen = listener.local_addr()?;
        let (partitioned, rx) = watch::channel(false);
        let (latency, slow) = watch::channel(None);
        let rx = Arc::new(rx);
        let task = tokio::spawn(async move {
            let mut connections = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                let cut = (*rx).clone();
                let slow = slow.clone();
                connections += 1;
                let seed = 0x9E37_79B9_7F4A_7C15 ^ (u64::from(listen.port()) << 32) ^ connections;
                tokio::spawn(async move {
                    if *cut.borrow() {
                        let mut c = cut.clone();
                        let _ = c.wait_for(|x| !*x).await;
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, cut.clone(), Some(slow), seed), pipe(sr, cw, cut, None, 0));
                });
            }
        });
        Ok(Self { listen, partitioned, latency, task })
    }

    /// Delays what the replica sends by a random time in `range` (`None`: no delay).
    pub fn set_latency(&self, range: Option<(Duration, Duration)>) {
        self.latency.send_replace(range);
    }

    /// Cuts the replica off (true) or heals (false).
    pub fn set_partitioned(&self, cut: bool) {
        self.partitioned.send_replace(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_spread_over_the_range() {
        let range = (Duration::from_millis(500), Duration::from_millis(3000));
        let mut state = 42;
        let d: Vec<Duration> = (0..1000).map(|_| pick(range, &mut state)).collect();
        assert!(d.iter().all(|d| *d >= range.0 && *d < range.1));
        let (lo, hi) =
            (d.iter().filter(|d| d.as_millis() < 1000).count(), d.iter().filter(|d| d.as_millis() > 2500).count());
        assert!(lo > 100 && hi > 100, "both ends of the range are used: {lo} below 1 s, {hi} above 2.5 s");
    }

    #[tokio::test]
    async fn forwards_then_blackholes_then_heals() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = upstream.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    while s.read_exact(&mut b).await.is_ok() {
                        if s.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(addr).await.expect("proxy");
        let echo = |mut s: TcpStream| async move {
            s.write_all(b"ping").await.ok()?;
            let mut b = [0u8; 4];
            tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut b)).await.ok()?.ok()?;
            Some((b, s))
        };
        let (b, conn) = echo(TcpStream::connect(proxy.listen).await.expect("connect")).await.expect("echo");
        assert_eq!(&b, b"ping");

        proxy.set_partitioned(true);
        assert!(echo(conn).await.is_none(), "an open connection hangs while partitioned");
        let fresh = TcpStream::connect(proxy.listen).await.expect("the listener still accepts");
        assert!(echo(fresh).await.is_none(), "a new connection hangs while partitioned");

        proxy.set_partitioned(false);
        let (b, conn) = echo(TcpStream::connect(proxy.listen).await.expect("connect")).await.expect("echo after heal");
        assert_eq!(&b, b"ping");

        // Slowed: the echo takes at least the smallest delay, on open and new connections.
        proxy.set_latency(Some((Duration::from_millis(150), Duration::from_millis(250))));
        let started = std::time::Instant::now();
        let (_, _) = echo(conn).await.expect("a slow echo still answers within 300 ms");
        assert!(started.elapsed() >= Duration::from_millis(150), "delayed: {:?}", started.elapsed());
        proxy.set_latency(None);
        let started = std::time::Instant::now();
        echo(TcpStream::connect(proxy.listen).await.expect("connect")).await.expect("echo");
        assert!(started.elapsed() < Duration::from_millis(100), "no delay once healed");
    }
}
