//! `socket`: try every kind of network access std offers.
//!
//! Loopback targets use `--port=N` (default 80) so a test can run a listener
//! there and check that nothing arrived. Targets off this machine (the cloud
//! metadata address 169.254.169.254 and a public DNS name) are only tried
//! with `--external=yes`: if containment were broken, a default run would
//! otherwise send real traffic off the machine.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;

use crate::{Ctx, attempt};

const PROBE: &[u8] = b"bulkhead-hostile\n";

pub fn socket(ctx: &Ctx) -> ExitCode {
    let port: u16 = match ctx.param("port").map(str::parse).transpose() {
        Ok(port) => port.unwrap_or(80),
        Err(e) => {
            eprintln!("hostile: bad --port: {e}");
            return ExitCode::from(2);
        }
    };
    let external = ctx.param("external") == Some("yes");

    let mut targets = vec![
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
    ];
    if external {
        targets.push("169.254.169.254:80".to_owned());
    } else {
        println!("attempt connect 169.254.169.254:80: skipped (pass --external=yes)");
    }
    for target in &targets {
        let addr: SocketAddr = target.parse().expect("literal socket address");
        if let Some(mut stream) = attempt(format!("connect {target}"), TcpStream::connect(addr)) {
            attempt(format!("send to {target}"), stream.write_all(PROBE));
        }
    }

    if let Some(socket) = attempt("udp bind 0.0.0.0:0", UdpSocket::bind("0.0.0.0:0")) {
        let to = format!("127.0.0.1:{port}");
        attempt(format!("udp send_to {to}"), socket.send_to(PROBE, &to));
    }

    if let Some(listener) = attempt("listen 0.0.0.0:8080", TcpListener::bind("0.0.0.0:8080")) {
        let local = listener.local_addr().map(|a| a.to_string());
        attempt("listener local_addr", local).inspect(|a| println!("  bound {a}"));
    }

    let mut names = vec!["localhost"];
    if external {
        names.push("example.com");
    } else {
        println!("attempt resolve example.com: skipped (pass --external=yes)");
    }
    for name in names {
        let resolved = (name, 80)
            .to_socket_addrs()
            .map(|addrs| addrs.collect::<Vec<_>>());
        if let Some(addrs) = attempt(format!("resolve {name}"), resolved) {
            for addr in addrs {
                println!("  address {addr}");
            }
        }
    }
    println!("done");
    ExitCode::SUCCESS
}
