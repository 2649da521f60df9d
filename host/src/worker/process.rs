//! Starting a worker process: the gateway's own binary, run with a
//! subcommand and its [`WorkerArgs`], its channel inherited as
//! [`CHANNEL_FD`], and nothing else of the gateway's: no environment, no
//! other descriptor, standard streams on `/dev/null`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{CHANNEL_FD, WorkerArgs};

/// A started worker: its process and the gateway's end of its channel.
#[derive(Debug)]
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// The gateway's end of the channel (blocking; convert with
    /// `tokio::net::UnixStream::from_std` after `set_nonblocking(true)`).
    pub channel: UnixStream,
}

/// Starts `program subcommand <args as JSON>` with the worker's end of a
/// fresh socketpair as descriptor [`CHANNEL_FD`] and `dirs` (directories
/// the gateway opened for it) as the descriptors after it, in order
/// ([`WORK_FD`](super::WORK_FD), [`CACHE_FD`](super::CACHE_FD)). The
/// worker reaches its directories only through these, so no directory
/// above them needs to be open to its user. The environment is
/// cleared (nothing of the gateway's, such as a token in a variable,
/// reaches a worker); the gateway's other descriptors are close-on-exec
/// already (Rust opens everything so).
///
/// # Errors
/// If the socketpair or the process cannot be created.
pub fn spawn(
    program: &Path,
    subcommand: &str,
    args: &WorkerArgs,
    dirs: &[&std::fs::File],
) -> io::Result<Spawned> {
    let (ours, theirs) = channel()?;
    let theirs: OwnedFd = theirs.into();
    let json = serde_json::to_string(args).map_err(io::Error::other)?;
    let mut command = Command::new(program);
    command
        .arg(subcommand)
        .arg(json)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let fd = theirs.as_raw_fd();
    if dirs.len() > 7 {
        return Err(io::Error::other(
            "at most 7 directories can be handed to a worker",
        ));
    }
    let extra: Vec<i32> = dirs.iter().map(|d| d.as_raw_fd()).collect();
    // SAFETY: between fork and exec this only calls `fcntl` and `dup2`,
    // which are async-signal-safe, on descriptors that stay open until
    // `command` is dropped (after `spawn` returns).
    unsafe {
        command.pre_exec(move || {
            // Every source first moves out of the way (a source may sit on
            // another's target), then lands on its target, where `dup2`
            // leaves it open across exec.
            let mut moved = [0; 8];
            for (i, &from) in std::iter::once(&fd).chain(&extra).enumerate() {
                let high = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 1000);
                if high < 0 {
                    return Err(io::Error::last_os_error());
                }
                moved[i] = high;
            }
            for (i, &high) in moved.iter().take(1 + extra.len()).enumerate() {
                if libc::dup2(high, CHANNEL_FD + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // The worker's end now lives only in the worker: when it dies, the
    // gateway's end reads end-of-file.
    drop(theirs);
    Ok(Spawned {
        child,
        channel: ours,
    })
}

/// `SO_PASSRIGHTS` (Linux 6.16 and later): off, a socket refuses
/// descriptors sent to it (`SCM_RIGHTS`), and the sender's `sendmsg` fails.
const SO_PASSRIGHTS: libc::c_int = 83;

/// A worker's channel: the gateway's end, then the worker's. The
/// gateway's end refuses descriptors where the kernel can (a worker that
/// sent one the gateway's reader never reached, its own end of the
/// channel, say, kept that end, and the frames waiting to be written to
/// it, alive after the worker was killed; found by an attacker). Where the
/// kernel cannot, a worker that is let go has its channel shut both ways,
/// which ends every write waiting on it.
///
/// # Errors
/// If the socketpair cannot be created, or the option is refused for
/// another reason than the kernel's not knowing it.
pub fn channel() -> io::Result<(UnixStream, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&off`, a
    // live c_int, on a socket this function owns.
    let set = unsafe {
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            std::ptr::from_ref(&off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENOPROTOOPT) {
            return Err(error);
        }
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!("this kernel cannot make a worker's channel refuse descriptors (SO_PASSRIGHTS, Linux 6.16): a worker let go has its channel shut instead");
        });
    }
    Ok((ours, theirs))
}

/// The channel of a worker started by [`spawn`], taken over from
/// [`CHANNEL_FD`]; `None` when that descriptor is not a socket.
pub fn inherited_channel() -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat on any descriptor number is sound; it fails on a
    // closed one.
    let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
    if unsafe { libc::fstat(CHANNEL_FD, stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: the descriptor is open and a socket, and nothing else in
    // this process owns it (it was inherited for this purpose).
    Some(unsafe { UnixStream::from_raw_fd(CHANNEL_FD) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;

    #[test]
    fn the_gateways_end_of_a_channel_refuses_descriptors() {
        let (mut ours, mut theirs) = channel().unwrap();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        let fds = [theirs.as_fd()];
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        let sent = rustix::net::sendmsg(
            &theirs,
            &[io::IoSlice::new(b"x")],
            &mut control,
            rustix::net::SendFlags::empty(),
        );
        assert_eq!(sent, Err(rustix::io::Errno::PERM), "a descriptor was taken");
        // Bytes alone go as ever.
        theirs.write_all(b"frame").unwrap();
        let mut got = [0; 5];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"frame");
    }
}
