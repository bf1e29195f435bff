//! Engine errors. Every failure the worker must classify (retry, quarantine a GPU, fail the job)
//! is its own variant.

/// Errors from an engine call.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served by this engine (unknown model, bad size); permanent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The job was cancelled between steps.
    #[error("cancelled at step {step}")]
    Cancelled { step: u32 },
    /// Device memory ran out; transient once caches are freed.
    #[error("out of memory on {device}: {message}")]
    OutOfMemory { device: String, message: String },
    /// A device produced an error or non-finite values; the device may be failing.
    #[error("device {device} failed: {message}")]
    Device { device: String, message: String },
    /// Weights or tokenizer files are missing, malformed, or do not match the model config.
    #[error("model load failed: {0}")]
    Load(String),
    /// A libtorch call failed in a way not classified above.
    #[error("torch error: {0}")]
    Torch(String),
    /// Encoding the output image failed.
    #[error("image encoding failed: {0}")]
    Encode(String),
    /// A step checkpoint cannot be used (corrupt, another plan, or the engine cannot resume); the
    /// job itself is fine: run it from the start.
    #[error("unusable checkpoint: {0}")]
    BadCheckpoint(String),
    /// Filesystem error while reading weights or writing output.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// Whether retrying the same request (after freeing caches, on this or another device) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, EngineError::OutOfMemory { .. } | EngineError::Device { .. })
    }
}

impl From<tch::TchError> for EngineError {
    fn from(e: tch::TchError) -> Self {
        let message = e.to_string();
        if message.contains("out of memory") {
            EngineError::OutOfMemory {
                device: "cuda".into(),
                message,
            }
        } else if message.contains("CUDA error") || message.contains("NCCL") {
            EngineError::Device {
                device: "cuda".into(),
                message,
            }
        } else {
            EngineError::Torch(message)
        }
    }
}
