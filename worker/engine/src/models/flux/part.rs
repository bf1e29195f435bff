//! Which part of the Flux transformer a [`Flux`] value holds: the whole model, or the contiguous
//! block range of one PipeFusion stage (see [`crate::parallel::pipefusion`]), so that a GPU holds
//! only its stage's weights. Variables keep their global names (`double_blocks.7.img_attn.qkv`),
//! so a part is filled from a full model or checkpoint by name.

use std::ops::Range;

use tch::{Device, Kind, TchError, nn};

use super::layers::{Linear, Res};
use super::transformer::{Config, DoubleBlock, Flux, LastLayer, MlpEmbedder, SingleBlock};
use crate::EngineError;

/// A part of the model. The conditioning embedders (`time_in`, `vector_in`, `guidance_in`: every
/// stage computes the per-step `vec`) are in every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Double-stream blocks held (global indices).
    pub double: Range<usize>,
    /// Single-stream blocks held (global indices).
    pub single: Range<usize>,
    /// Holds the input embedders `img_in` and `txt_in` (the first stage).
    pub input: bool,
    /// Holds `final_layer` (the last stage).
    pub output: bool,
}

impl Part {
    /// The whole model.
    pub fn full(c: &Config) -> Self {
        Self {
            double: 0..c.depth as usize,
            single: 0..c.depth_single_blocks as usize,
            input: true,
            output: true,
        }
    }

    pub fn is_full(&self, c: &Config) -> bool {
        *self == Self::full(c)
    }

    /// Blocks held, double then single.
    pub fn blocks(&self) -> usize {
        self.double.len() + self.single.len()
    }

    /// The error for a forward pass that needs the whole model.
    pub(crate) fn require_full(&self, c: &Config) -> Res<()> {
        if self.is_full(c) {
            Ok(())
        } else {
            Err(self.missing("every block"))
        }
    }

    pub(crate) fn missing(&self, what: &str) -> TchError {
        TchError::Torch(format!(
            "this Flux part (double blocks {:?}, single blocks {:?}, input {}, output {}) does not \
             hold {what}",
            self.double, self.single, self.input, self.output
        ))
    }

    /// `layer` (`img_in` or `txt_in`), held by the first stage only.
    pub(crate) fn input_layer<'a>(&self, layer: &'a Option<Linear>, name: &str) -> Res<&'a Linear> {
        layer.as_ref().ok_or_else(|| self.missing(name))
    }
}

impl Flux {
    /// Builds `part` of the model with randomly initialised weights on `device` in `kind`
    /// (variables created in the same order as the whole model's, so a seeded full build draws
    /// the same weights as before parts existed).
    pub fn new_part(config: &Config, device: Device, kind: Kind, part: &Part) -> Result<Self, EngineError> {
        let c = config;
        if part.double.end > c.depth as usize || part.single.end > c.depth_single_blocks as usize {
            return Err(EngineError::Load(format!(
                "Flux part {part:?} is outside the model's {} double and {} single blocks",
                c.depth, c.depth_single_blocks
            )));
        }
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let r = vs.root();
        let h = c.hidden_size;
        let (img_in, txt_in) = if part.input {
            (
                Some(Linear::new(&r / "img_in", c.in_channels, h, true)?),
                Some(Linear::new(&r / "txt_in", c.context_in_dim, h, true)?),
            )
        } else {
            (None, None)
        };
        let time_in = MlpEmbedder::new(&r / "time_in", 256, h)?;
        let vector_in = MlpEmbedder::new(&r / "vector_in", c.vec_in_dim, h)?;
        let guidance_in = if c.guidance_embed {
            Some(MlpEmbedder::new(&r / "guidance_in", 256, h)?)
        } else {
            None
        };
        let double_blocks = part
            .double
            .clone()
            .map(|i| DoubleBlock::new(&r / "double_blocks" / i, c))
            .collect::<Res<Vec<_>>>()?;
        let single_blocks = part
            .single
            .clone()
            .map(|i| SingleBlock::new(&r / "single_blocks" / i, c))
            .collect::<Res<Vec<_>>>()?;
        let final_layer = if part.output {
            Some(LastLayer::new(&r / "final_layer", c)?)
        } else {
            None
        };
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            part: part.clone(),
            img_in,
            txt_in,
            time_in,
            vector_in,
            guidance_in,
            double_blocks,
            single_blocks,
            final_layer,
            vs,
        })
    }

    /// A copy of `part` of this model on `device` (this model must hold every variable of
    /// `part`, e.g. be the whole model).
    pub fn copy_part(&self, part: &Part, device: Device) -> Result<Self, EngineError> {
        if self.is_fp8() {
            return self.copy_part_fp8(part, device);
        }
        let _guard = tch::no_grad_guard();
        let mut flux = {
            // Zero-initialised before the copy: faster, and leaves the global RNG untouched.
            let _zero = super::layers::NoRandomInit::new();
            Self::new_part(&self.config, device, self.kind(), part)?
        };
        flux.vs.copy(&self.vs)?;
        Ok(flux)
    }

    /// Number of weight elements held.
    pub fn parameters(&self) -> usize {
        self.vs.variables().values().map(|t| t.numel()).sum()
    }
}
