//! A TCP forwarder a test (or `bftfs-bench chaos`, which includes this file by path) controls,
//! to cut a replica off from its peers and reconnect it, and [`Mesh`], the proxies of a whole
//! cluster.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A TCP forwarder to `target`. While `cut`, new connections are closed at once and the
/// current ones have been shut down: the far side sees a dead peer, as with a pulled cable
/// that it notices.
pub struct Proxy {
    pub address: String,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let address = listener.local_addr().expect("addr").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(outbound) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                {
                    let mut open = o.lock().unwrap_or_else(|p| p.into_inner());
                    open.retain(|s| s.peer_addr().is_ok());
                    for s in [&inbound, &outbound] {
                        if let Ok(s) = s.try_clone() {
                            open.push(s);
                        }
                    }
                }
                for (mut from, mut to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { address, cut, open }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for s in self
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A proxy on every replica-to-replica link and on the client's link to each replica, so
/// that any replica can be cut off from all the others and the client at once.
pub struct Mesh {
    /// The real listening address of each replica (status probes go there directly).
    pub real: Vec<String>,
    /// links[i][j]: replica i's proxy to replica j (None for i == j).
    links: Vec<Vec<Option<Proxy>>>,
    /// The client's proxy to each replica.
    client_links: Vec<Proxy>,
}

impl Mesh {
    pub fn start(real: Vec<String>) -> Mesh {
        let n = real.len();
        let links = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (i != j).then(|| Proxy::start(real[j].clone())))
                    .collect()
            })
            .collect();
        let client_links = real.iter().map(|a| Proxy::start(a.clone())).collect();
        Mesh {
            real,
            links,
            client_links,
        }
    }

    /// `config` as replica `i` must see it: the others at its proxies to them. Addresses
    /// never enter the protocol, so each replica may have its own.
    pub fn replica_config(
        &self,
        config: &replica::config::ClusterConfig,
        i: usize,
    ) -> replica::config::ClusterConfig {
        let mut config = config.clone();
        for (j, r) in config.replicas.iter_mut().enumerate() {
            if let Some(p) = &self.links[i][j] {
                r.address = p.address.clone();
            }
        }
        config
    }

    /// `config` as the client must see it: every replica at the client's proxy to it.
    pub fn client_config(
        &self,
        config: &replica::config::ClusterConfig,
    ) -> replica::config::ClusterConfig {
        let mut config = config.clone();
        for (j, r) in config.replicas.iter_mut().enumerate() {
            r.address = self.client_links[j].address.clone();
        }
        config
    }

    /// Cuts replica `k` off from every other replica and from the client (or heals it).
    pub fn isolate(&self, k: usize, cut: bool) {
        for (i, row) in self.links.iter().enumerate() {
            for (j, link) in row.iter().enumerate() {
                if i == k || j == k {
                    if let Some(p) = link {
                        p.set_cut(cut);
                    }
                }
            }
        }
        self.client_links[k].set_cut(cut);
    }
}
