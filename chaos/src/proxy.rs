//! A TCP proxy per replica, between it and the API server, that can cut it off.
//!
//! While partitioned, the proxy forwards nothing in either direction on open connections and
//! accepts new ones without forwarding, like an `iptables DROP`: the replica sees requests hang
//! until its own timeouts fire, not a clean refusal. On heal, held connections are closed (as a
//! real network's state would have been lost) and new ones flow again.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; dropping it stops listening.
pub struct Proxy {
    /// Where replicas connect.
    pub listen: SocketAddr,
    partitioned: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
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
        let rx = Arc::new(rx);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = (*rx).clone();
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
                    tokio::join!(pipe(cr, sw, cut.clone()), pipe(sr, cw, cut));
                });
            }
        });
        Ok(Self { listen, partitioned, task })
    }

    /// Cuts the replica off (true) or heals (false).
    pub fn set_partitioned(&self, cut: bool) {
        self.partitioned.send_replace(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let (b, _) = echo(TcpStream::connect(proxy.listen).await.expect("connect")).await.expect("echo after heal");
        assert_eq!(&b, b"ping");
    }
}
