//! A communicator's side stream, ordered with libtorch's compute stream by events.
//!
//! A collective on the side stream starts after the compute stream's work so far
//! ([`SideStream::fork`]); the compute stream waits for it either right after it was enqueued
//! ([`SideStream::join`]: blocking collectives) or later ([`SideStream::mark`] then
//! [`SideStream::join_marked`]: a started collective, [`super::comm::Pending`]), so that compute
//! work enqueued in between overlaps the exchange. Both work inside a CUDA graph capture too:
//! the side stream joins the capture at the fork and leaves it at the join, as CUDA requires
//! (every forked stream is joined back before the capture ends).
//!
//! Memory: the caching allocator knows nothing of the side stream. Tensors a started collective
//! reads or writes are therefore held by its `Pending` until the compute stream has been ordered
//! after it; only then can their memory go back to the compute stream's pool.
#![allow(unsafe_code)] // CUDA driver calls through cudarc: every unsafe block states what it relies on.

use cudarc::driver::DriverError;
use cudarc::driver::result::{event, stream};
use cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
use cudarc::driver::sys::{CUevent, CUevent_flags, CUstream};

/// A non-blocking stream and the events that order it with a compute stream.
pub(crate) struct SideStream {
    pub(crate) stream: CUstream,
    /// Recorded on the compute stream; the side stream waits for it.
    before: CUevent,
    /// Recorded on the side stream after a blocking collective; the compute stream waits for it.
    after: CUevent,
    /// Recorded on the side stream after started collectives, round robin; each `Pending`
    /// waits for its own.
    marks: [CUevent; MARKS],
    next: std::cell::Cell<usize>,
}

/// Marks kept per side stream: up to this many started collectives can be waited for one by one
/// (a double block has five in flight at most). With more outstanding, a mark is reused: the
/// older `Pending` then waits for the newer collective too (longer, never too little, as the
/// side stream runs them in order).
const MARKS: usize = 8;

/// A mark of [`SideStream::mark`], for [`SideStream::join_marked`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark(usize);

// SAFETY: created on, and only used from, the rank thread that owns the communicator (it moves
// to that thread before first use; the side stream is created lazily there).
unsafe impl Send for SideStream {}

impl SideStream {
    /// A new stream and its events on the calling thread's current CUDA context.
    pub(crate) fn new() -> Result<Self, DriverError> {
        let flags = CUevent_flags::CU_EVENT_DISABLE_TIMING;
        Ok(Self {
            stream: stream::create(stream::StreamKind::NonBlocking)?,
            before: event::create(flags)?,
            after: event::create(flags)?,
            marks: [
                event::create(flags)?,
                event::create(flags)?,
                event::create(flags)?,
                event::create(flags)?,
                event::create(flags)?,
                event::create(flags)?,
                event::create(flags)?,
                event::create(flags)?,
            ],
            next: std::cell::Cell::new(0),
        })
    }

    /// The side stream waits for everything enqueued on `compute` so far.
    pub(crate) fn fork(&self, compute: CUstream) -> Result<(), DriverError> {
        // SAFETY: the stream and events were created on this thread's context and live as long
        // as `self`; `compute` is libtorch's current stream on the same device.
        unsafe {
            event::record(self.before, compute)?;
            stream::wait_event(self.stream, self.before, CU_EVENT_WAIT_DEFAULT)
        }
    }

    /// `compute` waits for everything enqueued on the side stream so far.
    pub(crate) fn join(&self, compute: CUstream) -> Result<(), DriverError> {
        // SAFETY: as in `fork`.
        unsafe {
            event::record(self.after, self.stream)?;
            stream::wait_event(compute, self.after, CU_EVENT_WAIT_DEFAULT)
        }
    }

    /// Marks the side stream's work so far, for a later [`SideStream::join_marked`].
    pub(crate) fn mark(&self) -> Result<Mark, DriverError> {
        let i = self.next.get();
        self.next.set((i + 1) % MARKS);
        // SAFETY: as in `fork`.
        unsafe { event::record(self.marks[i], self.stream)? };
        Ok(Mark(i))
    }

    /// `compute` waits for the side stream's work up to `mark` (see [`MARKS`] for marks reused).
    pub(crate) fn join_marked(&self, compute: CUstream, mark: Mark) -> Result<(), DriverError> {
        // SAFETY: as in `fork`.
        unsafe { stream::wait_event(compute, self.marks[mark.0], CU_EVENT_WAIT_DEFAULT) }
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: created by `SideStream::new`, destroyed once; pending work completes first
        // (CUDA defers the release of a stream/event with outstanding work).
        unsafe {
            let _ = event::destroy(self.before);
            let _ = event::destroy(self.after);
            for m in self.marks {
                let _ = event::destroy(m);
            }
            let _ = stream::destroy(self.stream);
        }
    }
}

/// libtorch's current stream on CUDA device `ordinal` (the legacy default stream, or the capture
/// stream while a CUDA graph of the step is being captured).
pub(crate) fn compute_stream(ordinal: usize) -> Result<CUstream, tch::TchError> {
    Ok(crate::aten::current_stream(ordinal)?.cast())
}
