//! Collecting a job's outputs from its `/out` directory.
//!
//! The directory was written by a guest assumed hostile, so this module never
//! follows a symlink (directories are opened with `O_NOFOLLOW`, files with
//! `O_NOFOLLOW | O_NONBLOCK`) and reads only regular files, checked with
//! `fstat` on the opened handle rather than a name lookup that could change in
//! between. Everything else — symlinks, FIFOs, sockets, devices, names that
//! are not UTF-8, trees deeper than [`MAX_DEPTH`] — is listed as skipped, with
//! why, and never opened for reading.

use std::io::{self, Read, Write};
use std::path::Path;

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How deep collection descends into `/out`.
pub const MAX_DEPTH: usize = 16;

/// One collected output: a regular file under `/out`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutputFile {
    /// Path relative to `/out`, `/`-separated.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
}

/// An entry of `/out` that was not collected, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SkippedOutput {
    /// Path relative to `/out` (lossy if the name is not UTF-8).
    pub name: String,
    /// Why: `symlink`, `fifo`, `socket`, `device`, `not-utf8`, `too-deep`,
    /// `unreadable`.
    pub reason: String,
}

/// What collection found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// Regular files, sorted by name.
    pub files: Vec<OutputFile>,
    /// Everything else.
    pub skipped: Vec<SkippedOutput>,
}

/// Hashes every regular file under `out_dir` and, when `copy_to` is given,
/// copies each into the same relative path there.
///
/// # Errors
/// Only if `out_dir` itself cannot be opened or `copy_to` cannot be written;
/// a bad entry inside `out_dir` is skipped, not an error.
pub fn collect(out_dir: &Path, copy_to: Option<&Path>) -> io::Result<Collected> {
    let root = Dir::open_ambient_dir(out_dir, ambient_authority())?;
    let mut collected = Collected::default();
    walk(&root, "", 0, copy_to, &mut collected)?;
    collected.files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(collected)
}

fn walk(
    dir: &Dir,
    prefix: &str,
    depth: usize,
    copy_to: Option<&Path>,
    out: &mut Collected,
) -> io::Result<()> {
    for entry in dir.entries()? {
        let entry = entry?;
        let raw_name = entry.file_name();
        let Some(name) = raw_name.to_str() else {
            out.skipped
                .push(skipped(prefix, &raw_name.to_string_lossy(), "not-utf8"));
            continue;
        };
        let rel = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        // `file_type` comes from the directory entry or `lstat`; it never
        // follows a link.
        let ty = entry.file_type()?;
        if ty.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                out.skipped.push(skipped(prefix, name, "too-deep"));
                continue;
            }
            match dir.open_dir_nofollow(name) {
                Ok(sub) => walk(&sub, &rel, depth + 1, copy_to, out)?,
                Err(_) => out.skipped.push(skipped(prefix, name, "unreadable")),
            }
        } else if ty.is_file() {
            match read_regular(dir, name, copy_to.map(|d| d.join(&rel)).as_deref()) {
                Ok(Some((size, sha256))) => out.files.push(OutputFile {
                    name: rel,
                    size,
                    sha256,
                }),
                Ok(None) => out.skipped.push(skipped(prefix, name, "not-regular")),
                Err(e) if e.kind() == io::ErrorKind::Other => return Err(e),
                Err(_) => out.skipped.push(skipped(prefix, name, "unreadable")),
            }
        } else {
            out.skipped.push(skipped(prefix, name, kind_of(&ty)));
        }
    }
    Ok(())
}

fn skipped(prefix: &str, name: &str, reason: &str) -> SkippedOutput {
    let name = if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    };
    SkippedOutput {
        name,
        reason: reason.to_owned(),
    }
}

fn kind_of(ty: &cap_std::fs::FileType) -> &'static str {
    use cap_std::fs::FileTypeExt;
    if ty.is_symlink() {
        "symlink"
    } else if ty.is_fifo() {
        "fifo"
    } else if ty.is_socket() {
        "socket"
    } else if ty.is_block_device() || ty.is_char_device() {
        "device"
    } else {
        "unknown"
    }
}

/// Opens `name` without following links and without blocking (a FIFO swapped
/// in would otherwise block the open), then confirms on the handle that it
/// is a regular file. Returns size and digest, or `None` if it is not
/// regular. Copy failures are reported as `ErrorKind::Other` so the caller
/// fails instead of skipping.
fn read_regular(
    dir: &Dir,
    name: &str,
    copy_to: Option<&Path>,
) -> io::Result<Option<(u64, String)>> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .follow(FollowSymlinks::No)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let mut file = dir.open_with(name, &options)?;
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut sink = match copy_to {
        Some(path) => {
            let parent = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(io::Error::other)?;
            Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::other(format!("cannot write {}: {e}", path.display()))
                    })?,
            )
        }
        None => None,
    };
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if let Some(sink) = sink.as_mut() {
            sink.write_all(&buf[..n]).map_err(io::Error::other)?;
        }
    }
    Ok(Some((size, hex::encode(hasher.finalize()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_regular_files_and_skips_links_and_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let secret = tmp.path().join("secret");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(&secret, b"host secret").unwrap();
        std::fs::write(out.join("ok.txt"), b"ok").unwrap();
        std::os::unix::fs::symlink(&secret, out.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../secret", out.join("rel-link")).unwrap();
        std::fs::create_dir(out.join("sub")).unwrap();
        std::fs::write(out.join("sub/nested.txt"), b"n").unwrap();
        std::os::unix::fs::symlink(tmp.path(), out.join("dir-link")).unwrap();
        let fifo = out.join("pipe");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        let dest = tmp.path().join("dest");
        let got = collect(&out, Some(&dest)).unwrap();
        let names: Vec<_> = got.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["ok.txt", "sub/nested.txt"]);
        let mut skipped: Vec<_> = got
            .skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason.as_str()))
            .collect();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                ("abs-link", "symlink"),
                ("dir-link", "symlink"),
                ("pipe", "fifo"),
                ("rel-link", "symlink")
            ]
        );
        assert_eq!(std::fs::read(dest.join("ok.txt")).unwrap(), b"ok");
        assert!(!dest.join("abs-link").exists());
        assert!(!dest.join("rel-link").exists());
    }
}
