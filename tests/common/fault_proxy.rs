//! A fault-injecting TCP proxy for loopback tests: between dtta and a storage server it
//! resets connections, answers 503 SlowDown, stalls, and cuts responses mid-body.
//! Decisions are per connection, from a seeded RNG; counters say what was injected.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Probabilities per connection (the rest is forwarded untouched).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub reset: f64,
    pub slow_down: f64,
    pub stall: f64,
    /// Forward, but cut the response after a random number of bytes.
    pub cut: f64,
    pub stall_for: Duration,
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicUsize,
    pub resets: AtomicUsize,
    pub slow_downs: AtomicUsize,
    pub stalls: AtomicUsize,
    pub cuts: AtomicUsize,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "{} connections: {} reset, {} 503 SlowDown, {} stalled, {} cut mid-response",
            self.connections.load(Ordering::Relaxed),
            self.resets.load(Ordering::Relaxed),
            self.slow_downs.load(Ordering::Relaxed),
            self.stalls.load(Ordering::Relaxed),
            self.cuts.load(Ordering::Relaxed)
        )
    }
}

pub struct FaultProxy {
    pub port: u16,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream: u16, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(faults.seed)));
        let accept = {
            let (stats, stop) = (stats.clone(), stop.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let index = stats.connections.fetch_add(1, Ordering::Relaxed);
                    let (roll, cut_at) = {
                        let mut r = rng.lock().unwrap();
                        // Half the cuts early in a response, half deep into a shard's body.
                        let cut_at = if r.random::<bool>() {
                            r.random_range(100..2_000usize)
                        } else {
                            r.random_range(2_000..200_000)
                        };
                        // The first connections meet each kind of fault once, so every run
                        // exercises all of them; the rest are random.
                        let edges = [
                            0.0,
                            faults.reset,
                            faults.reset + faults.slow_down,
                            faults.reset + faults.slow_down + faults.stall,
                        ];
                        let roll = match edges.get(index) {
                            Some(edge) => edge + 1e-9,
                            None => r.random::<f64>(),
                        };
                        (roll, cut_at.min(if index == 3 { 150 } else { usize::MAX }))
                    };
                    let stats = stats.clone();
                    std::thread::spawn(move || handle(client, upstream, faults, roll, cut_at, &stats));
                }
            })
        };
        FaultProxy {
            port,
            stats,
            stop,
            accept: Some(accept),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Closes with RST instead of FIN (SO_LINGER 0), like a dropped connection.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// Reads the request head (and a body announced by Content-Length).
fn read_request(client: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::io::copy(&mut client.take(len as u64), &mut std::io::sink());
}

fn handle(mut client: TcpStream, upstream: u16, f: Faults, roll: f64, cut_at: usize, stats: &Stats) {
    let mut edge = f.reset;
    if roll < edge {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        read_request(&mut client);
        return reset(client);
    }
    edge += f.slow_down;
    if roll < edge {
        stats.slow_downs.fetch_add(1, Ordering::Relaxed);
        read_request(&mut client);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let _ = write!(
            client,
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    edge += f.stall;
    if roll < edge {
        stats.stalls.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(f.stall_for);
        return reset(client);
    }
    let cut = roll < edge + f.cut;
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return reset(client);
    };
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let upload = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let mut server = server;
    if cut {
        let mut sent = 0;
        let mut buf = [0u8; 8192];
        while sent < cut_at {
            match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let n = n.min(cut_at - sent);
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
            }
        }
        if sent >= cut_at {
            stats.cuts.fetch_add(1, Ordering::Relaxed);
        }
        let _ = server.shutdown(Shutdown::Both);
        reset(client);
    } else {
        let _ = std::io::copy(&mut server, &mut client);
        let _ = client.shutdown(Shutdown::Write);
    }
    let _ = upload.join();
}
