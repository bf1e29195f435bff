//! The engine's output image and its PNG encoding.

use crate::{EngineError, StageTimings};

/// An 8-bit RGB image with the timings of the generation that made it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    pub timings: StageTimings,
}

impl GeneratedImage {
    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>, EngineError> {
        let expected = self.width as usize * self.height as usize * 3;
        if self.rgb.len() != expected {
            return Err(EngineError::Encode(format!(
                "rgb buffer has {} bytes, expected {expected} for {}x{}",
                self.rgb.len(),
                self.width,
                self.height
            )));
        }
        let mut out = Vec::with_capacity(expected / 2);
        {
            let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder
                .write_header()
                .map_err(|e| EngineError::Encode(e.to_string()))?;
            writer
                .write_image_data(&self.rgb)
                .map_err(|e| EngineError::Encode(e.to_string()))?;
        }
        Ok(out)
    }
}
