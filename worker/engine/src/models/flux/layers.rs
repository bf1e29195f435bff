//! The shared layers, under the path the Flux modules have always imported them from (they live
//! in [`crate::nn`]).

pub use crate::nn::{Conv2d, Embedding, GroupNorm, LayerNorm, Linear, NoRandomInit, Res, RmsNorm, sdpa};
