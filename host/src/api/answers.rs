//! Answers held in memory: a bound on the bytes the answers of jobs with
//! reports may hold at once, and on each tenant's share of it.
//!
//! A job's report can list tens of thousands of outputs: its answer holds
//! the decoded report from the store's read until the client has read the
//! last byte, its body written from it as the client reads ([`ViewBody`]),
//! never held whole (its links, percent-encoding each name, made bodies five
//! times the report). Without a bound, 56 `GET`s at once of one 48 MB report
//! held 6 GB. Each heavy answer reserves what it will hold before it is
//! built ([`HELD_PER_BYTE`] times its stored JSON); a reservation over the
//! tenant's share (a quarter) or the total is refused with 429 and
//! `Retry-After` (the request can be repeated as it is), and the reservation
//! is given back when the body is done or dropped. No report stored by this
//! service needs more than a share: a job whose report would is cut to fit
//! when it ends ([`JobReport::fit`], to [`crate::job::largest_report`]). One
//! that does all the same (stored under a larger `max_buffered_answers`, by
//! this node before or by another) is refused for good, 507
//! `report_too_large`, rather than answered beyond the bound. The
//! reservation is made from the report's stored length, before the job is
//! read: a refusal costs one small query, not a read and decode of the
//! report. A light answer (a report under [`HEAVY_REPORT`]) is encoded
//! whole, and its reservation lasts as long as its encoded bytes do: given
//! back when the connection has written the last of them, not when the
//! body is handed over ([`light_body`]). What the bound holds is the
//! process's resident set, as the allocator gives freed answers back
//! ([`crate::serve::memory`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::ApiError;
use crate::job::{HEAVY_REPORT, HELD_PER_BYTE, JobReport, OutputFile};

/// How long a refused client is told to wait.
const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Default)]
struct Held {
    /// Per tenant: the bytes its answers reserved.
    tenants: HashMap<String, u64>,
    total: u64,
}

/// Answers with reports in flight, bounded in bytes, in all and per tenant.
#[derive(Debug)]
pub struct Answers {
    max_bytes: u64,
    tenant_share: u64,
    held: Mutex<Held>,
}

impl Answers {
    /// A bound of `max_bytes` for all answers, a quarter of it per tenant.
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            tenant_share: crate::job::answers_share(max_bytes),
            held: Mutex::default(),
        })
    }

    /// What answering a report stored as `len` bytes of JSON reserves
    /// (nothing for a job without one). Known before the report is read.
    pub fn cost_of_len(len: u64) -> u64 {
        len.saturating_mul(HELD_PER_BYTE)
    }

    /// Reserves `bytes` for one of `tenant`'s answers, until the permit
    /// is dropped.
    ///
    /// # Errors
    /// [`ApiError::TooManyRequests`] when the tenant's answers already
    /// hold its share, or all answers the total;
    /// [`ApiError::ReportTooLarge`] when `bytes` is more than a share.
    pub fn acquire(self: &Arc<Self>, tenant: &str, bytes: u64) -> Result<AnswerPermit, ApiError> {
        self.reserve(tenant, bytes)?;
        Ok(AnswerPermit {
            answers: Arc::clone(self),
            tenant: tenant.to_owned(),
            bytes,
        })
    }

    fn reserve(&self, tenant: &str, bytes: u64) -> Result<(), ApiError> {
        if bytes == 0 {
            return Ok(());
        }
        if bytes > self.tenant_share {
            return Err(ApiError::ReportTooLarge(format!(
                "the job's report is {} bytes of JSON, more than this service answers ({} bytes: `max_buffered_answers` over {})",
                bytes / HELD_PER_BYTE,
                crate::job::largest_report(self.max_bytes),
                4 * HELD_PER_BYTE
            )));
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let reserved = held.tenants.get(tenant).copied().unwrap_or(0);
        let refusal = if reserved + bytes > self.tenant_share {
            Some(format!(
                "tenant `{tenant}` already has {reserved} bytes of job reports being answered"
            ))
        } else if held.total + bytes > self.max_bytes {
            Some("the service is answering as many job reports as it may; retry".to_owned())
        } else {
            None
        };
        if let Some(message) = refusal {
            return Err(ApiError::TooManyRequests {
                message,
                retry_after: RETRY_AFTER_SECS,
            });
        }
        held.tenants.insert(tenant.to_owned(), reserved + bytes);
        held.total += bytes;
        Ok(())
    }

    /// Bytes all answers hold now.
    #[cfg(test)]
    pub fn held(&self) -> u64 {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One answer's reservation; dropping it gives it back.
#[derive(Debug)]
pub struct AnswerPermit {
    answers: Arc<Answers>,
    tenant: String,
    bytes: u64,
}

impl AnswerPermit {
    /// Grows the reservation to what answering a report stored as `len`
    /// bytes reserves, before it is read.
    ///
    /// # Errors
    /// As [`Answers::acquire`]; the reservation is then unchanged.
    pub fn cover_len(&mut self, len: u64) -> Result<(), ApiError> {
        let needed = Answers::cost_of_len(len);
        if needed > self.bytes {
            self.answers.reserve(&self.tenant, needed - self.bytes)?;
            self.bytes = needed;
        }
        Ok(())
    }

    /// Grows the reservation to what answering `report` reserves, when the
    /// report was stored between its length's read and the job's (the
    /// length said none). A stored report never changes, so a reservation
    /// made from one covers it.
    ///
    /// # Errors
    /// As [`Answers::acquire`]; the reservation is then unchanged.
    pub fn cover(&mut self, report: Option<&JobReport>) -> Result<(), ApiError> {
        // Counted by its JSON, as the store counts it: `weight` can say a
        // report of names needing escapes is light when it is not. A light
        // one is measured here, a heavy one off the async threads.
        let Some(report) = report.filter(|_| self.bytes == 0) else {
            return Ok(());
        };
        let len = if report.json_bound() >= HEAVY_REPORT as u64 {
            crate::blocking(|| report.json_len())
        } else {
            report.json_len()
        };
        let needed = Answers::cost_of_len(len);
        self.answers.reserve(&self.tenant, needed)?;
        self.bytes = needed;
        Ok(())
    }
}

impl Drop for AnswerPermit {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut held = self.answers.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total -= self.bytes;
        if let Some(reserved) = held.tenants.get_mut(&self.tenant) {
            *reserved -= self.bytes;
            if *reserved == 0 {
                held.tenants.remove(&self.tenant);
            }
        }
        drop(held);
        if self.bytes >= Answers::cost_of_len(HEAVY_REPORT as u64) {
            // A heavy answer is done: what the allocator kept of it goes
            // back.
            crate::serve::memory::trim_soon();
        }
    }
}

/// A light answer's encoded body, holding `held` for as long as any of its
/// bytes are: the connection may keep them queued long after the body was
/// handed over (a client that reads nothing), and they are given back,
/// with the reservation, only when the last is written or dropped.
pub fn light_body(json: Vec<u8>, held: AnswerPermit) -> Bytes {
    if held.bytes == 0 {
        return Bytes::from(json);
    }
    struct Held {
        json: Vec<u8>,
        _permit: AnswerPermit,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.json
        }
    }
    Bytes::from_owner(Held {
        json,
        _permit: held,
    })
}

/// Bytes per frame of a [`ViewBody`] (about: an item is not split).
const FRAME: usize = 64 << 10;

/// A heavy job's view, encoded as the connection takes it, a frame at a
/// time: the view's JSON around its two lists of outputs (the report's, and
/// their links) is built whole — it is small but for captured output, which
/// is bounded — and each list is written from the decoded outputs as the
/// client reads, so the answer holds the decoded report and one frame, never
/// the whole body (whose links, percent-encoding each name, can be five times
/// the report). The body is done, and its reservation given back, only once
/// the connection has taken its last frame.
pub struct ViewBody {
    /// The JSON up to the report's outputs' `[`.
    head: Bytes,
    files: Vec<OutputFile>,
    /// The job's id, for the links.
    job: String,
    /// From the report's outputs' `]` up to the links' `[`.
    middle: Bytes,
    /// After the links' `]`.
    tail: Bytes,
    stage: Stage,
    /// The next of `files` to write.
    next: usize,
    _permit: Option<AnswerPermit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Head,
    Files,
    Middle,
    Links,
    Tail,
    Done,
}

impl ViewBody {
    /// `head`, `files` as JSON, `middle`, `files`' links as JSON, `tail`.
    pub fn new(
        [head, middle, tail]: [Bytes; 3],
        files: Vec<OutputFile>,
        job: String,
        permit: Option<AnswerPermit>,
    ) -> Self {
        Self {
            head,
            files,
            job,
            middle,
            tail,
            stage: Stage::Head,
            next: 0,
            _permit: permit,
        }
    }

    /// The next frame, `None` once all was written.
    fn frame(&mut self) -> Result<Option<Bytes>, serde_json::Error> {
        loop {
            let (part, next) = match self.stage {
                Stage::Head => (&mut self.head, Stage::Files),
                Stage::Middle => (&mut self.middle, Stage::Links),
                Stage::Tail => (&mut self.tail, Stage::Done),
                Stage::Files | Stage::Links => {
                    if self.next == self.files.len() {
                        self.next = 0;
                        self.stage = if self.stage == Stage::Files {
                            Stage::Middle
                        } else {
                            Stage::Tail
                        };
                        continue;
                    }
                    let mut out = Vec::with_capacity(FRAME + 1024);
                    while self.next < self.files.len() && out.len() < FRAME {
                        if self.next > 0 {
                            out.push(b',');
                        }
                        let file = &self.files[self.next];
                        if self.stage == Stage::Files {
                            serde_json::to_writer(&mut out, file)?;
                        } else {
                            serde_json::to_writer(
                                &mut out,
                                &super::jobs::OutputLink::of(&self.job, file),
                            )?;
                        }
                        self.next += 1;
                    }
                    return Ok(Some(Bytes::from(out)));
                }
                Stage::Done => return Ok(None),
            };
            if part.is_empty() {
                self.stage = next;
                continue;
            }
            return Ok(Some(part.split_to(part.len().min(FRAME))));
        }
    }
}

impl http_body::Body for ViewBody {
    type Data = Bytes;
    type Error = serde_json::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(
            self.get_mut()
                .frame()
                .transpose()
                .map(|f| f.map(Frame::data)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.stage == Stage::Done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_holds_at_most_its_share_and_all_at_most_the_total() {
        let answers = Answers::new(400);
        let a1 = answers.acquire("a", 60).unwrap();
        let a2 = answers.acquire("a", 40).unwrap();
        assert!(matches!(
            answers.acquire("a", 1),
            Err(ApiError::TooManyRequests { .. })
        ));
        let b = answers.acquire("b", 100).unwrap();
        let c = answers.acquire("c", 100).unwrap();
        let d = answers.acquire("d", 100).unwrap();
        assert!(
            answers.acquire("e", 1).is_err(),
            "the total is held, whoever asks"
        );
        assert!(
            answers.acquire("e", 0).is_ok(),
            "an answer without a report never waits"
        );
        drop((a1, b));
        assert_eq!(answers.held(), 240);
        let a3 = answers.acquire("a", 60).unwrap();
        drop((a2, a3, c, d));
        assert_eq!(answers.held(), 0);
        assert!(answers.held.lock().unwrap().tenants.is_empty());
    }

    /// A light answer's bytes can stay queued on a connection long after
    /// its body was handed over: the reservation goes with the last of
    /// them, not before.
    #[test]
    fn a_light_body_holds_its_reservation_until_its_last_byte_is_gone() {
        let answers = Answers::new(1 << 20);
        let body = light_body(vec![b'x'; 250], answers.acquire("a", 1000).unwrap());
        let tail = body.slice(200..);
        drop(body);
        assert_eq!(answers.held(), 1000, "a slice of it still holds it");
        drop(tail);
        assert_eq!(answers.held(), 0);
        let free = light_body(vec![b'x'; 10], answers.acquire("a", 0).unwrap());
        assert_eq!(&free[..], b"xxxxxxxxxx");
    }

    #[test]
    fn a_report_heavier_than_a_share_is_refused_for_good_and_takes_nothing() {
        let answers = Answers::new(4 << 20);
        let largest = crate::job::largest_report(4 << 20);
        assert_eq!(largest, 256 << 10);
        let a = answers
            .acquire("a", Answers::cost_of_len(largest))
            .expect("the largest report fits a share");
        assert!(matches!(
            answers.acquire("b", Answers::cost_of_len(largest + 1)),
            Err(ApiError::ReportTooLarge(_))
        ));
        assert!(matches!(
            answers.acquire("b", Answers::cost_of_len(u64::MAX)),
            Err(ApiError::ReportTooLarge(_))
        ));
        assert_eq!(answers.held(), Answers::cost_of_len(largest));
        drop(a);
        assert_eq!(answers.held(), 0);
    }
}
