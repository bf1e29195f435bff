//! The numeric format a model version's transformer computes in, chosen per model version by the
//! operator (a bf16 and an FP8 build of one checkpoint are two versions to the router).

use std::fmt;
use std::str::FromStr;

/// How the transformer's large linear layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The weights' own dtype: bf16 on GPUs (fp32 on the CPU, where bf16 matmuls are slow).
    #[default]
    Bf16,
    /// FP8 (e4m3fn) linear layers in the transformer blocks ([`crate::nn::fp8`]): weights
    /// quantised per output channel, activations per token, scaled GEMMs with bf16 output. On the
    /// CPU the same arithmetic is emulated in fp32.
    Fp8,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::Bf16, Precision::Fp8];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" => Ok(Precision::Bf16),
            "fp8" | "fp8-e4m3" | "e4m3" => Ok(Precision::Fp8),
            other => Err(format!("precision {other:?}: must be bf16 or fp8")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses_its_names_and_rejects_others_by_name() {
        for p in Precision::ALL {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        assert_eq!(" FP8 ".parse::<Precision>().unwrap(), Precision::Fp8);
        let e = "fp16".parse::<Precision>().unwrap_err();
        assert!(e.contains("\"fp16\"") && e.contains("bf16 or fp8"), "{e}");
        assert_eq!(serde_json::to_string(&Precision::Fp8).unwrap(), "\"fp8\"");
    }
}
