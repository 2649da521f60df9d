//! The `/out` quota: a byte budget and an entry budget enforced inside the
//! `wasi:filesystem/types` host implementation.
//!
//! wasmtime-wasi has no quota knob, so the sandbox links this wrapper in
//! place of wasmtime-wasi's own `wasi:filesystem/types`. Every call is
//! delegated to wasmtime-wasi unchanged, except that each way a guest can make
//! a file bigger or create an entry is charged to the job's [`OutputQuota`]
//! *before* it happens:
//!
//! - `write(buf, offset)` and `set-size(size)`: charged the growth of the
//!   file's apparent size (`max(0, end - current size)`), so a write or
//!   truncate far past the end — a sparse file — pays for its hole;
//! - `write-via-stream` / `append-via-stream`: the returned stream is wrapped
//!   in a [`QuotaStream`] that charges each chunk the same way (this also
//!   covers `write-zeroes` and `splice`, which go through the stream's
//!   `write`);
//! - `open-at` with `create` on a path that does not resolve to an entry
//!   (a dangling symlink counts as missing), `create-directory-at`
//!   and `symlink-at`: one entry each;
//! - `link-at`: refused outright; hard links could alias files across
//!   preopens and nothing a processor does needs them.
//!
//! Charges are never refunded (deleting a file does not return its bytes), so
//! the charged total is an upper bound on what `/out` can hold at any moment:
//! the quota is on bytes *written*, as the policy documents. Only this module
//! knows about the quota; the rest of the sandbox reads [`OutputQuota`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::filesystem::WasiFilesystemCtxView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{FsError, FsResult};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream, OutputStream, StreamError};

use super::limits::{LimitKind, LimitLatch};

/// The `/out` budget of one job, shared by the filesystem wrapper and the
/// streams it hands out.
#[derive(Debug)]
pub struct OutputQuota {
    max_bytes: u64,
    max_entries: u64,
    bytes: AtomicU64,
    entries: AtomicU64,
    /// Host file descriptors the guest holds open (files, directories,
    /// directory listings), and the most it may.
    open: AtomicU64,
    max_open: u64,
    latch: LimitLatch,
}

impl OutputQuota {
    /// A budget of `max_bytes` bytes and `max_entries` created entries.
    /// `max_open` bounds the host descriptors the job may hold at once.
    pub fn new(max_bytes: u64, max_entries: u64, max_open: u64, latch: LimitLatch) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            max_entries,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max_open,
            latch,
        })
    }

    /// Takes one host descriptor. A guest at its bound gets an error for
    /// this open (no limit fires: closing something lets it go on).
    fn take_descriptor(&self) -> Result<(), ErrorCode> {
        if Self::charge(&self.open, self.max_open, 1) {
            Ok(())
        } else {
            Err(ErrorCode::InsufficientMemory)
        }
    }

    /// Gives one back (the preopens were never taken: saturate at 0).
    fn release_descriptor(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Bytes charged so far.
    pub fn bytes_charged(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Entries charged so far.
    pub fn entries_charged(&self) -> u64 {
        self.entries.load(Ordering::SeqCst)
    }

    fn charge(counter: &AtomicU64, max: u64, amount: u64) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(amount).filter(|total| *total <= max)
            })
            .is_ok()
    }

    /// Charges `growth` bytes; on refusal fires the `output` limit.
    fn charge_bytes(&self, growth: u64) -> Result<(), ErrorCode> {
        if growth == 0 || Self::charge(&self.bytes, self.max_bytes, growth) {
            Ok(())
        } else {
            self.latch.fire(LimitKind::Output);
            Err(ErrorCode::Quota)
        }
    }

    /// Charges one created entry; on refusal fires the `output_files` limit.
    fn charge_entry(&self) -> Result<(), ErrorCode> {
        if Self::charge(&self.entries, self.max_entries, 1) {
            Ok(())
        } else {
            self.latch.fire(LimitKind::OutputFiles);
            Err(ErrorCode::Quota)
        }
    }
}

/// Growth of a file of `size` bytes when bytes up to `end` are written.
fn growth(size: u64, offset: u64, len: u64) -> Result<u64, ErrorCode> {
    let end = offset.checked_add(len).ok_or(ErrorCode::Quota)?;
    Ok(end.saturating_sub(size))
}

/// `HasData` marker for linking [`QuotaFs`] as `wasi:filesystem/types`.
#[derive(Debug)]
pub struct QuotaFsData;

impl HasData for QuotaFsData {
    type Data<'a> = QuotaFs<'a>;
}

/// wasmtime-wasi's filesystem view plus the job's quota.
pub struct QuotaFs<'a> {
    /// wasmtime-wasi's own implementation, which every call reaches.
    pub inner: WasiFilesystemCtxView<'a>,
    /// The job's budget.
    pub quota: &'a Arc<OutputQuota>,
}

impl QuotaFs<'_> {
    /// The current apparent size of `fd` if it is a regular file (one
    /// `fstat`, cheap enough to do before every write).
    fn file_size(&self, fd: &Resource<types::Descriptor>) -> Option<u64> {
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        match self.inner.table.get(&borrowed) {
            Ok(types::Descriptor::File(f)) => f.file.metadata().ok().map(|m| m.len()),
            _ => None,
        }
    }

    /// Whether `path` resolves to an existing entry under `fd`, resolving a
    /// final symlink exactly as the open will (`path_flags`): a dangling link
    /// opened with `create` creates its target, which must be charged.
    async fn exists_at(
        &mut self,
        fd: &Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: &str,
    ) -> bool {
        let borrowed = Resource::new_borrow(fd.rep());
        HostDescriptor::stat_at(&mut self.inner, borrowed, path_flags, path.to_owned())
            .await
            .is_ok()
    }

    /// Replaces the stream at `stream` with a [`QuotaStream`] around it.
    fn wrap_stream(
        &mut self,
        stream: Resource<DynOutputStream>,
        position: u64,
        size: u64,
    ) -> FsResult<Resource<DynOutputStream>> {
        let inner: DynOutputStream = self.inner.table.delete(stream)?;
        let wrapped: DynOutputStream = Box::new(QuotaStream {
            inner,
            position,
            known_size: size,
            quota: Arc::clone(self.quota),
        });
        Ok(self.inner.table.push(wrapped)?)
    }
}

impl types::Host for QuotaFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.inner, err)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        types::Host::filesystem_error_code(&mut self.inner, err)
    }
}

impl HostDescriptor for QuotaFs<'_> {
    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        self.inner.advise(fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.inner.sync_data(fd).await
    }

    async fn get_flags(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorFlags> {
        self.inner.get_flags(fd).await
    }

    async fn get_type(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorType> {
        self.inner.get_type(fd).await
    }

    async fn set_size(
        &mut self,
        fd: Resource<types::Descriptor>,
        size: types::Filesize,
    ) -> FsResult<()> {
        if let Some(current) = self.file_size(&fd) {
            self.quota.charge_bytes(size.saturating_sub(current))?;
        }
        self.inner.set_size(fd, size).await
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        self.inner.set_times(fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        self.inner.read(fd, len, offset).await
    }

    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        if let Some(current) = self.file_size(&fd) {
            self.quota
                .charge_bytes(growth(current, offset, buf.len() as u64)?)?;
        }
        self.inner.write(fd, buf, offset).await
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        self.quota.take_descriptor()?;
        let stream = self.inner.read_directory(fd).await;
        if stream.is_err() {
            self.quota.release_descriptor();
        }
        stream
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.inner.sync(fd).await
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        self.quota.charge_entry()?;
        self.inner.create_directory_at(fd, path).await
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        self.inner.stat(fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        self.inner.stat_at(fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        self.inner
            .set_times_at(fd, path_flags, path, atim, mtim)
            .await
    }

    async fn link_at(
        &mut self,
        _fd: Resource<types::Descriptor>,
        _old_path_flags: types::PathFlags,
        _old_path: String,
        _new_descriptor: Resource<types::Descriptor>,
        _new_path: String,
    ) -> FsResult<()> {
        Err(ErrorCode::NotPermitted.into())
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        if oflags.contains(types::OpenFlags::CREATE)
            && !self.exists_at(&fd, path_flags, &path).await
        {
            self.quota.charge_entry()?;
        }
        self.quota.take_descriptor()?;
        let opened = self
            .inner
            .open_at(fd, path_flags, path, oflags, flags)
            .await;
        if opened.is_err() {
            self.quota.release_descriptor();
        }
        opened
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        self.quota.release_descriptor();
        HostDescriptor::drop(&mut self.inner, fd)
    }

    async fn readlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<String> {
        self.inner.readlink_at(fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        self.inner.remove_directory_at(fd, path).await
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.inner.rename_at(fd, old_path, new_fd, new_path).await
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        self.quota.charge_entry()?;
        self.inner.symlink_at(fd, src_path, dest_path).await
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        self.inner.unlink_file_at(fd, path).await
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        self.inner.read_via_stream(fd, offset)
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let size = self.file_size(&fd).unwrap_or(0);
        let stream = self.inner.write_via_stream(fd, offset)?;
        self.wrap_stream(stream, offset, size)
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let size = self.file_size(&fd).unwrap_or(0);
        let stream = self.inner.append_via_stream(fd)?;
        self.wrap_stream(stream, size, size)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        self.inner.is_same_object(a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        self.inner.metadata_hash(fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        self.inner.metadata_hash_at(fd, path_flags, path).await
    }
}

impl HostDirectoryEntryStream for QuotaFs<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        self.inner.read_directory_entry(stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        self.quota.release_descriptor();
        HostDirectoryEntryStream::drop(&mut self.inner, stream)
    }
}

/// A file output stream that charges growth to the quota before each write.
///
/// `known_size` starts at the file's size when the stream was opened and
/// rises with every byte this stream writes past it. Writes by other
/// descriptors meanwhile can only make `known_size` too small, which makes
/// this stream over-charge, never under-charge.
struct QuotaStream {
    inner: DynOutputStream,
    position: u64,
    known_size: u64,
    quota: Arc<OutputQuota>,
}

#[async_trait::async_trait]
impl OutputStream for QuotaStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let len = bytes.len() as u64;
        let charge =
            growth(self.known_size, self.position, len).and_then(|g| self.quota.charge_bytes(g));
        if charge.is_err() {
            // ENOSPC reaches the guest as `insufficient-space`, the closest
            // stream-level error to a quota.
            let err = std::io::Error::from_raw_os_error(libc::ENOSPC);
            return Err(StreamError::LastOperationFailed(wasmtime::Error::new(err)));
        }
        self.inner.write(bytes)?;
        self.position += len;
        self.known_size = self.known_size.max(self.position);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        self.inner.check_write()
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[async_trait::async_trait]
impl Pollable for QuotaStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_counts_holes_and_ignores_overwrites() {
        assert_eq!(growth(100, 0, 50).unwrap(), 0);
        assert_eq!(growth(100, 90, 50).unwrap(), 40);
        assert_eq!(growth(0, 1 << 33, 1).unwrap(), (1 << 33) + 1);
        assert!(growth(0, u64::MAX, 2).is_err());
    }

    #[test]
    fn descriptors_are_bounded_and_given_back() {
        let latch = LimitLatch::default();
        let q = OutputQuota::new(10, 1, 2, latch.clone());
        q.take_descriptor().unwrap();
        q.take_descriptor().unwrap();
        assert_eq!(q.take_descriptor(), Err(ErrorCode::InsufficientMemory));
        q.release_descriptor();
        q.take_descriptor().unwrap();
        // Dropping the preopens (never taken) does not go below zero or
        // hand out extra descriptors.
        for _ in 0..5 {
            q.release_descriptor();
        }
        q.take_descriptor().unwrap();
        q.take_descriptor().unwrap();
        assert!(q.take_descriptor().is_err());
        assert_eq!(
            latch.fired(),
            None,
            "no limit fires: the guest may close and go on"
        );
    }

    #[test]
    fn charges_stop_at_the_budget_and_name_the_limit() {
        let latch = LimitLatch::default();
        let q = OutputQuota::new(10, 1, 8, latch.clone());
        assert!(q.charge_bytes(10).is_ok());
        assert_eq!(q.charge_bytes(1), Err(ErrorCode::Quota));
        assert_eq!(latch.fired(), Some(LimitKind::Output));
        assert_eq!(q.bytes_charged(), 10);
        assert!(q.charge_entry().is_ok());
        assert_eq!(q.charge_entry(), Err(ErrorCode::Quota));
    }
}
