//! A worker's work directory as a file system of its own: a tmpfs of a
//! given size and an inode count that goes with it, made with
//! `fsopen`/`fsmount` and attached
//! nowhere. It is reached only through the descriptors the gateway holds
//! and hands to its worker, so no path leads to it, and a compromised
//! worker (native code past the first wall, which no `/out` quota meters)
//! fills at most that much memory, not the zone's work directory and the
//! host's `/dev/shm` with it. The last descriptor closed (the worker gone,
//! its outputs copied) frees it.
//!
//! Mounting needs `CAP_SYS_ADMIN` (the gateway running as root); elsewhere
//! a worker's directory is a plain directory in the zone's work directory,
//! bounded by nothing but that file system (said at the pool's start).

use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};

/// Inodes a worker's directory holds beyond one per page of its size: its
/// own entries (its jobs' directories are in their rooms).
pub const INODE_FLOOR: u64 = 1_024;

/// The inodes a worker's directory of `size` bytes holds: one per page of
/// it, and [`INODE_FLOOR`]. A job's room counts a page for each entry it
/// may make (`disk::need_for`), so the entries of the jobs a directory was
/// sized for always fit in it, and a job cannot take another's by making
/// empty files (found by an attacker: with a fixed 65,536, two jobs each
/// allowed 33,000 files filled a worker's inode table, and every other
/// job sent to it failed). Each costs the kernel under a KiB.
pub fn inodes(size: u64) -> u64 {
    INODE_FLOOR + size / 4096
}

/// A worker's directory: the mount and a directory descriptor of its root.
#[derive(Debug)]
pub struct Scratch {
    /// The root, opened as a directory (the mount's own descriptor is a
    /// path-only one).
    pub dir: OwnedFd,
    /// The mount itself, kept for as long as the directory.
    _mount: OwnedFd,
}

/// Makes a tmpfs of `size` bytes and its [`inodes`], its root mode 0700
/// and owned by `owner` when given, mounted nowhere, without set-uid or
/// device files, and without huge pages (a page a file, as rooms count
/// them, whatever the host's `shmem_enabled` says).
///
/// # Errors
/// `EPERM` without `CAP_SYS_ADMIN`; what else the kernel says.
pub fn make(size: u64, owner: Option<(u32, u32)>) -> io::Result<Scratch> {
    use rustix::mount::{fsconfig_create, fsconfig_set_string, fsmount, fsopen};
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "size", size.to_string())?;
    fsconfig_set_string(&fs, "nr_inodes", inodes(size).to_string())?;
    fsconfig_set_string(&fs, "huge", "never")?;
    fsconfig_set_string(&fs, "mode", "0700")?;
    if let Some((uid, gid)) = owner {
        fsconfig_set_string(&fs, "uid", uid.to_string())?;
        fsconfig_set_string(&fs, "gid", gid.to_string())?;
    }
    fsconfig_create(&fs)?;
    let mount = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )?;
    let dir = rustix::fs::openat(
        &mount,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(Scratch { dir, _mount: mount })
}

impl Scratch {
    /// Makes its size `size` bytes (in whole pages) and its inodes those
    /// of that size, its other settings kept.
    ///
    /// # Errors
    /// `EINVAL` when its files take more than `size`, or its entries more
    /// inodes; what else the kernel says.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        use rustix::mount::{FsPickFlags, fsconfig_reconfigure, fsconfig_set_string, fspick};
        // A context of its own each time: one the kernel refused a size
        // is spent.
        let fs = fspick(
            &self.dir,
            "",
            FsPickFlags::FSPICK_EMPTY_PATH | FsPickFlags::FSPICK_CLOEXEC,
        )?;
        fsconfig_set_string(&fs, "size", size.to_string())?;
        fsconfig_set_string(&fs, "nr_inodes", inodes(size).to_string())?;
        fsconfig_reconfigure(&fs)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Writes past its size fail with `ENOSPC` at the size; it is a tmpfs
    /// reached through its descriptor only (`/proc/self/fd/N`), with no
    /// entry in this process's mount table; its owner is the one given.
    /// A scratch directory, or `None` (said) where this process may not
    /// mount one.
    fn scratch(size: u64, owner: Option<(u32, u32)>) -> Option<Scratch> {
        match make(size, owner) {
            Ok(s) => Some(s),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: mounting a tmpfs needs CAP_SYS_ADMIN ({e})");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn size_of(scratch: &Scratch) -> u64 {
        let st = rustix::fs::fstatfs(&scratch.dir).unwrap();
        st.f_blocks * st.f_bsize as u64
    }

    /// Resized, it holds its new size: grown, a write the old size
    /// refused goes in; it cannot shrink below what its files take, and
    /// can to exactly that; its inode count and owner stay.
    #[test]
    fn a_scratch_directory_resizes_down_to_its_files_and_no_lower() {
        let Some(scratch) = scratch(64 << 10, Some((65534, 65534))) else {
            return;
        };
        let file = crate::sandbox::beneath::fd_path(&scratch.dir).join("f");
        assert_eq!(
            std::fs::write(&file, vec![1u8; 256 << 10])
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOSPC)
        );
        scratch.resize(1 << 20).unwrap();
        assert_eq!(size_of(&scratch), 1 << 20);
        std::fs::write(&file, vec![1u8; 256 << 10]).unwrap();
        let err = scratch.resize(128 << 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert_eq!(size_of(&scratch), 1 << 20);
        scratch.resize(256 << 10).unwrap();
        assert_eq!(size_of(&scratch), 256 << 10);
        let st = rustix::fs::fstatfs(&scratch.dir).unwrap();
        assert_eq!(st.f_files, inodes(256 << 10));
        let meta = rustix::fs::fstat(&scratch.dir).unwrap();
        assert_eq!((meta.st_uid, meta.st_mode & 0o7777), (65534, 0o700));
        std::fs::remove_file(&file).unwrap();
        scratch.resize(64 << 10).unwrap();
        assert_eq!(size_of(&scratch), 64 << 10);
    }

    /// Its inodes go with its size: empty files fill them at the count
    /// of its size, a larger size takes more, and it cannot shrink below
    /// the entries it holds.
    #[test]
    fn a_scratch_directory_holds_an_inode_per_page_of_its_size() {
        let Some(scratch) = scratch(64 << 10, None) else {
            return;
        };
        let root = crate::sandbox::beneath::fd_path(&scratch.dir);
        let fill = |from: u64| {
            (from..).find(
                |n| match std::fs::File::create_new(root.join(format!("e{n}"))) {
                    Ok(_) => false,
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                        true
                    }
                },
            )
        };
        let made = fill(0).unwrap();
        // The root takes one.
        assert_eq!(made, inodes(64 << 10) - 1);
        scratch.resize(128 << 10).unwrap();
        assert_eq!(fill(made).unwrap(), inodes(128 << 10) - 1);
        let err = scratch.resize(64 << 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn a_scratch_directory_holds_its_size_and_no_more() {
        let Some(scratch) = scratch(1 << 20, Some((65534, 65534))) else {
            return;
        };
        let root = crate::sandbox::beneath::fd_path(&scratch.dir);
        let st = rustix::fs::fstatfs(&scratch.dir).unwrap();
        assert_eq!(st.f_type, libc::TMPFS_MAGIC);
        let meta = rustix::fs::fstat(&scratch.dir).unwrap();
        assert_eq!((meta.st_uid, meta.st_gid), (65534, 65534));
        assert_eq!(meta.st_mode & 0o7777, 0o700);
        let mut f = std::fs::File::create(root.join("fill")).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0u64;
        let err = loop {
            match f.write_all(&chunk) {
                Ok(()) => written += chunk.len() as u64,
                Err(e) => break e,
            }
            assert!(written <= 4 << 20, "wrote {written} bytes into 1 MiB");
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(written <= 1 << 20, "{written}");
        let id = rustix::fs::statx(
            &scratch.dir,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::MNT_ID,
        )
        .unwrap()
        .stx_mnt_id
        .to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.lines().any(|l| l.split(' ').next() == Some(&id)),
            "mount {id} is in the mount table"
        );
    }
}
