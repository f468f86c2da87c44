//! healthCheckNodePort servers for externalTrafficPolicy Local LoadBalancers, as kube-proxy
//! runs them: the cloud load balancer probes `http://<node>:<healthCheckNodePort>/` and only
//! sends to nodes that answer 200, i.e. nodes with at least one local ready endpoint. We
//! answer the same JSON kube-proxy does:
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`
//! with 200 when N > 0 and 503 otherwise.
//!
//! A port we cannot bind (kube-proxy on the same node already serves it, which is fine: it
//! answers the same) is logged once and retried on later updates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use log::{info, warn};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::state::HealthCheck;

/// Requests larger than this are answered without reading the rest.
const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

type Shared = Arc<RwLock<BTreeMap<u16, HealthCheck>>>;

pub struct HealthServers {
    bind: IpAddr,
    current: Shared,
    tasks: BTreeMap<u16, JoinHandle<()>>,
    /// Ports whose bind failed, with the error we logged (logged again only if it changes).
    failed: BTreeMap<u16, String>,
}

impl HealthServers {
    pub fn new(bind: IpAddr) -> Self {
        HealthServers {
            bind,
            current: Arc::new(RwLock::new(BTreeMap::new())),
            tasks: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Serves exactly `wanted`: new ports are bound, gone ones closed, counts updated.
    pub async fn update(&mut self, wanted: BTreeMap<u16, HealthCheck>) {
        if let Ok(mut cur) = self.current.write() {
            *cur = wanted.clone();
        }
        let gone: Vec<u16> = self
            .tasks
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(task) = self.tasks.remove(&port) {
                task.abort();
                info!("stopped serving healthCheckNodePort {port}");
            }
        }
        self.failed.retain(|p, _| wanted.contains_key(p));
        for (port, hc) in &wanted {
            if self.tasks.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::new(self.bind, *port);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(
                        "serving healthCheckNodePort {addr} for Service {}/{}",
                        hc.namespace, hc.name
                    );
                    self.failed.remove(port);
                    let shared = self.current.clone();
                    let port = *port;
                    self.tasks
                        .insert(port, tokio::spawn(serve(listener, port, shared)));
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.failed.get(port) != Some(&text) {
                        warn!(
                            "cannot serve healthCheckNodePort {addr} for Service {}/{}: {text}{}; \
                             retrying on the next change",
                            hc.namespace,
                            hc.name,
                            if e.kind() == std::io::ErrorKind::AddrInUse {
                                " (kube-proxy on this node may serve it already)"
                            } else {
                                ""
                            }
                        );
                        self.failed.insert(*port, text);
                    }
                }
            }
        }
    }

    /// Ports being served now.
    pub fn serving(&self) -> Vec<u16> {
        self.tasks.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, port: u16, shared: Shared) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("healthCheckNodePort {port}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = shared.read().ok().and_then(|m| m.get(&port).cloned());
        tokio::spawn(async move {
            let _ = answer_one(stream, answer).await;
        });
    }
}

async fn answer_one(mut stream: TcpStream, hc: Option<HealthCheck>) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    // Read the request head (we answer every path, like kube-proxy).
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        while len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    stream.write_all(response(hc.as_ref()).as_bytes()).await?;
    stream.shutdown().await
}

/// The full HTTP response for a health check.
pub fn response(hc: Option<&HealthCheck>) -> String {
    let (status, body, weight) = match hc {
        Some(hc) => (
            if hc.local_endpoints > 0 {
                "200 OK"
            } else {
                "503 Service Unavailable"
            },
            format!(
                "{{\"service\":{{\"namespace\":{},\"name\":{}}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
                serde_json::Value::String(hc.namespace.clone()),
                serde_json::Value::String(hc.name.clone()),
                hc.local_endpoints
            ),
            hc.local_endpoints,
        ),
        None => ("503 Service Unavailable", "{}".to_string(), 0),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {weight}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthcheck_answers_200_with_local_endpoints_and_503_without() {
        let mut hc = HealthCheck {
            namespace: "ui".into(),
            name: "ui-nlb".into(),
            local_endpoints: 2,
        };
        let ok = response(Some(&hc));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let body = ok.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["service"]["namespace"], "ui");
        assert_eq!(v["service"]["name"], "ui-nlb");
        assert_eq!(v["localEndpoints"], 2);
        assert!(ok.contains(&format!("Content-Length: {}\r\n", body.len())));
        hc.local_endpoints = 0;
        let down = response(Some(&hc));
        assert!(
            down.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{down}"
        );
        assert!(down.contains("\"localEndpoints\":0"));
    }

    #[tokio::test]
    async fn healthcheck_server_follows_updates() {
        let mut servers = HealthServers::new(IpAddr::from([127, 0, 0, 1]));
        // Find a free port by binding and releasing it.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let hc = |n| HealthCheck {
            namespace: "ui".into(),
            name: "ui-nlb".into(),
            local_endpoints: n,
        };
        servers.update(BTreeMap::from([(port, hc(1))])).await;
        assert_eq!(servers.serving(), vec![port]);
        assert!(get(port).await.starts_with("HTTP/1.1 200 OK"));
        servers.update(BTreeMap::from([(port, hc(0))])).await;
        assert!(get(port).await.starts_with("HTTP/1.1 503"));
        servers.update(BTreeMap::new()).await;
        assert!(servers.serving().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    }

    async fn get(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
