//! Output downloads: streamed from the file in fixed-size chunks (or from
//! the shared blob store chunk by chunk), a bound on each tenant's
//! concurrent downloads, and the header and URL forms of an output's name.
//!
//! A download holds one [`CHUNK`]-sized buffer (one blob chunk of at most
//! [`crate::blob::PG_CHUNK`] from the shared store) and the connection's
//! write buffer, whatever the output's size: the body is read only as the client
//! takes it, so a slow reader costs the service almost nothing but its
//! [`DownloadPermit`]. Names come from untrusted guests: they reach a header
//! only as a sanitized ASCII fallback and an RFC 5987 percent-encoded form,
//! and a URL only percent-encoded segment by segment.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::io::{AsyncRead, ReadBuf};

use super::ApiError;

/// Bytes read from the file per body frame.
pub const CHUNK: usize = 64 << 10;

/// How long a tenant refused for too many downloads is told to wait.
const RETRY_AFTER_SECS: u64 = 1;

/// Concurrent downloads per tenant, bounded.
#[derive(Debug)]
pub struct Downloads {
    max_per_tenant: usize,
    running: Mutex<HashMap<String, usize>>,
}

impl Downloads {
    /// A bound of `max_per_tenant` concurrent downloads for each tenant.
    pub fn new(max_per_tenant: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_tenant,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for one download of `tenant`, held until its body is done
    /// or dropped (the client went away).
    ///
    /// # Errors
    /// [`ApiError::TooManyRequests`] when the tenant already has
    /// `max_per_tenant` downloads running.
    pub fn acquire(self: &Arc<Self>, tenant: &str) -> Result<DownloadPermit, ApiError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let count = running.entry(tenant.to_owned()).or_insert(0);
        if *count >= self.max_per_tenant {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "tenant `{tenant}` already has {} downloads running",
                    self.max_per_tenant
                ),
                retry_after: RETRY_AFTER_SECS,
            });
        }
        *count += 1;
        Ok(DownloadPermit {
            downloads: Arc::clone(self),
            tenant: tenant.to_owned(),
        })
    }

    /// Downloads `tenant` has running.
    #[cfg(test)]
    pub fn running(&self, tenant: &str) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(tenant).copied().unwrap_or(0)
    }
}

/// One running download; dropping it frees the tenant's slot.
#[derive(Debug)]
pub struct DownloadPermit {
    downloads: Arc<Downloads>,
    tenant: String,
}

impl Drop for DownloadPermit {
    fn drop(&mut self) {
        let mut running = self
            .downloads
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = running.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.tenant);
            }
        }
    }
}

/// A response body exactly `len` bytes long, read as the client takes it:
/// from a file [`CHUNK`] bytes at a time, or from a blob store's chunk
/// stream one chunk at a time. A source that ends early or runs long (a
/// file that shrinks meanwhile, a blob removed under the download) ends the
/// body with an error, which aborts the connection rather than sending a
/// short or long body.
pub struct FileBody {
    source: Source,
    left: u64,
    _permit: DownloadPermit,
}

enum Source {
    File {
        file: tokio::fs::File,
        buf: Box<[u8]>,
    },
    Chunks(crate::blob::ChunkStream),
}

impl std::fmt::Debug for FileBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBody")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl FileBody {
    /// Streams `len` bytes of `output`, holding `permit` until done.
    pub fn new(output: crate::blob::OutputReader, len: u64, permit: DownloadPermit) -> Self {
        let source = match output {
            crate::blob::OutputReader::File(file) => Source::File {
                file: tokio::fs::File::from_std(file),
                buf: vec![0; CHUNK].into_boxed_slice(),
            },
            crate::blob::OutputReader::Chunks(chunks) => Source::Chunks(chunks),
        };
        Self {
            source,
            left: len,
            _permit: permit,
        }
    }
}

fn cut_short(message: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, message)
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let data = match &mut this.source {
            Source::File { file, buf } => {
                let want = usize::try_from(this.left).map_or(CHUNK, |left| left.min(CHUNK));
                let mut read = ReadBuf::new(&mut buf[..want]);
                ready!(Pin::new(file).poll_read(cx, &mut read))?;
                Bytes::copy_from_slice(read.filled())
            }
            Source::Chunks(chunks) => match ready!(chunks.as_mut().poll_next(cx)) {
                Some(chunk) => chunk?,
                None => Bytes::new(),
            },
        };
        if data.is_empty() {
            this.left = 0;
            return Poll::Ready(Some(Err(cut_short("output shrank while being downloaded"))));
        }
        if data.len() as u64 > this.left {
            this.left = 0;
            return Poll::Ready(Some(Err(cut_short("output grew while being downloaded"))));
        }
        this.left -= data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// RFC 5987 `attr-char`: everything else is percent-encoded.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// RFC 3986 unreserved characters stay; everything else in a path segment
/// is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `Content-Disposition` value for an output (RFC 6266): `attachment`,
/// an ASCII `filename` fallback (printable ASCII only, quotes and
/// backslashes replaced) and `filename*` with the UTF-8 name
/// percent-encoded. Controls and text-reordering characters are replaced by
/// `_` in both. The result is always a valid header value.
pub fn content_disposition(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let clean: String = base
        .chars()
        .map(|c| {
            if crate::sandbox::unprintable(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let clean = if clean.is_empty() {
        "output".to_owned()
    } else {
        clean
    };
    let fallback: String = clean
        .chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' && c != '%' => c,
            _ => '_',
        })
        .collect();
    let mut value = format!("attachment; filename=\"{fallback}\"");
    let _ = write!(
        value,
        "; filename*=UTF-8''{}",
        utf8_percent_encode(&clean, ATTR_CHAR)
    );
    value
}

/// The download path of output `name` of job `id`, each segment
/// percent-encoded.
pub fn output_url(id: &str, name: &str) -> String {
    let mut url = format!("/v1/jobs/{}/outputs", utf8_percent_encode(id, SEGMENT));
    for segment in name.split('/') {
        url.push('/');
        let _ = write!(url, "{}", utf8_percent_encode(segment, SEGMENT));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_are_ascii_and_never_carry_controls_or_bidi() {
        let cases = [
            (
                "a.png",
                "attachment; filename=\"a.png\"; filename*=UTF-8''a.png",
            ),
            (
                "dir/r\u{e9}sum\u{e9} 1.pdf",
                "attachment; filename=\"r_sum_ 1.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%201.pdf",
            ),
            (
                "evil\r\nSet-Cookie: a=b",
                "attachment; filename=\"evil__Set-Cookie: a=b\"; filename*=UTF-8''evil__Set-Cookie%3A%20a%3Db",
            ),
            (
                "invoice\u{202E}fdp.exe",
                "attachment; filename=\"invoice_fdp.exe\"; filename*=UTF-8''invoice_fdp.exe",
            ),
            (
                "q\"uote\\s%41\u{85}\u{1b}",
                "attachment; filename=\"q_uote_s_41__\"; filename*=UTF-8''q%22uote%5Cs%2541__",
            ),
            (
                "dir/",
                "attachment; filename=\"output\"; filename*=UTF-8''output",
            ),
        ];
        for (name, want) in cases {
            let got = content_disposition(name);
            assert_eq!(got, want, "{name:?}");
            assert!(
                axum::http::HeaderValue::from_str(&got).is_ok() && got.is_ascii(),
                "{got:?}"
            );
        }
    }

    #[test]
    fn output_urls_encode_each_segment() {
        assert_eq!(output_url("j1", "a.png"), "/v1/jobs/j1/outputs/a.png");
        assert_eq!(
            output_url("j1", "d i r/a?b#c%\r\n\u{202E}.txt"),
            "/v1/jobs/j1/outputs/d%20i%20r/a%3Fb%23c%25%0D%0A%E2%80%AE.txt"
        );
    }

    fn chunks(parts: &[&'static [u8]]) -> crate::blob::OutputReader {
        let parts: Vec<std::io::Result<Bytes>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        crate::blob::OutputReader::Chunks(Box::pin(futures_util::stream::iter(parts)))
    }

    #[tokio::test]
    async fn a_chunked_body_is_exactly_its_length_or_an_error() {
        use http_body_util::BodyExt as _;
        let downloads = Downloads::new(4);
        let body = FileBody::new(
            chunks(&[b"abc", b"", b"defg"]),
            7,
            downloads.acquire("t").unwrap(),
        );
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(7));
        // An empty chunk in the middle ends it early: the body says so.
        assert!(body.collect().await.is_err());
        let body = FileBody::new(
            chunks(&[b"abc", b"defg"]),
            7,
            downloads.acquire("t").unwrap(),
        );
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdefg");
        let short = FileBody::new(chunks(&[b"abc"]), 7, downloads.acquire("t").unwrap());
        assert!(short.collect().await.is_err(), "a blob that ends early");
        let long = FileBody::new(
            chunks(&[b"abc", b"defgh"]),
            7,
            downloads.acquire("t").unwrap(),
        );
        assert!(long.collect().await.is_err(), "a blob longer than stored");
        assert_eq!(downloads.running("t"), 0, "every permit is given back");
    }

    #[test]
    fn permits_bound_each_tenant_and_free_on_drop() {
        let downloads = Downloads::new(2);
        let a1 = downloads.acquire("a").unwrap();
        let _a2 = downloads.acquire("a").unwrap();
        assert!(matches!(
            downloads.acquire("a"),
            Err(ApiError::TooManyRequests { .. })
        ));
        let _b = downloads
            .acquire("b")
            .expect("another tenant is not bound by a");
        drop(a1);
        assert_eq!(downloads.running("a"), 1);
        let _a3 = downloads.acquire("a").unwrap();
    }
}
