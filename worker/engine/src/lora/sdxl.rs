//! SDXL's LoRA key mapping ([`SdxlLora`]): adapter modules in either format onto the engine's
//! variables, which keep diffusers' names (`unet.<UNet2DConditionModel name>`,
//! `text_encoder.<CLIPTextModel name>`, `text_encoder_2.<CLIPTextModelWithProjection name>`):
//!
//! * diffusers/PEFT: `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
//!   `text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (also without `text_model.`, as
//!   transformers 5 names it), `text_encoder_2.…`; every module is one variable;
//! * kohya/sd-scripts: SDXL LoRAs name the UNet's modules in the ORIGINAL single-file (SGM)
//!   layout, `.` -> `_` (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
//!   `lora_unet_input_blocks_4_0_in_layers_2` for a resnet's `conv1`), mapped through
//!   [`crate::models::sdxl::unet_keys`]; the diffusers-named form some trainers write
//!   (`lora_unet_down_blocks_1_attentions_0_…`) is read too. Text encoders: `lora_te1_…` and
//!   `lora_te2_…` with transformers' names.
//!
//! Linear layers and convolutions (LoCon: `down` `(r, in, kh, kw)`, `up` `(out, r, 1, 1)`, 1x1
//! and 3x3 alike) are both targets: every 2-D and 4-D weight of the UNet, and every Linear of the
//! text encoders' layers. Norms, embeddings and the second encoder's `text_projection` take no
//! LoRA (neither diffusers' PEFT targets nor sd-scripts' modules include them).

use std::collections::{BTreeMap, HashMap};

use super::flux::clip_linear_shapes;
use super::{Family, Format, Placement, Weights};
use crate::flux::clip::{self, ClipTextModel};
use crate::models::sdxl::unet::Unet;
use crate::models::sdxl::unet_keys::{ORIGINAL_PREFIX, original_key};

pub const UNET: &str = "unet";
pub const TEXT_ENCODER: &str = "text_encoder";
pub const TEXT_ENCODER_2: &str = "text_encoder_2";

/// See the module docs.
#[derive(Debug, Clone)]
pub struct SdxlLora {
    shapes: BTreeMap<String, Vec<i64>>,
    places: HashMap<(Format, String), Placement>,
}

impl SdxlLora {
    /// The mapping for `unet` (its variables' shapes: every rank holds the whole UNet) and text
    /// encoders of configs `te1` and `te2`.
    pub fn new(unet: &Unet, te1: &clip::Config, te2: &clip::Config) -> Self {
        let shapes: BTreeMap<String, Vec<i64>> = unet
            .vs
            .variables()
            .into_iter()
            .filter(|(n, t)| n.ends_with(".weight") && matches!(t.dim(), 2 | 4))
            .map(|(n, t)| (n, t.size()))
            .collect();
        Self::from_shapes(unet, shapes, te1, te2)
    }

    fn from_shapes(
        unet: &Unet,
        unet_shapes: BTreeMap<String, Vec<i64>>,
        te1: &clip::Config,
        te2: &clip::Config,
    ) -> Self {
        let mut shapes = BTreeMap::new();
        let mut places = HashMap::new();
        for (name, shape) in unet_shapes {
            let var = format!("{UNET}.{name}");
            let whole = Placement::whole(&var, shape[0]);
            let stem = name.trim_end_matches(".weight");
            let original = original_key(&unet.config, &name);
            let original = original.strip_prefix(ORIGINAL_PREFIX).unwrap_or(&original);
            let original = original.trim_end_matches(".weight");
            for (format, module) in [
                (Format::Peft, format!("{UNET}.{stem}")),
                (Format::Kohya, format!("lora_unet_{}", original.replace('.', "_"))),
                (Format::Kohya, format!("lora_unet_{}", stem.replace('.', "_"))),
            ] {
                places.insert((format, module), whole.clone());
            }
            shapes.insert(var, shape);
        }
        for (component, kohya, config) in [
            (TEXT_ENCODER, "lora_te1_", te1),
            (TEXT_ENCODER_2, "lora_te2_", te2),
        ] {
            for (name, shape) in clip_linear_shapes(config) {
                let var = format!("{component}.{name}");
                let stem = name.trim_end_matches(".weight");
                let whole = Placement::whole(&var, shape[0]);
                let bare = stem.strip_prefix("text_model.").unwrap_or(stem);
                for (format, module) in [
                    (Format::Peft, format!("{component}.{stem}")),
                    (Format::Peft, format!("{component}.{bare}")),
                    (Format::Kohya, format!("{kohya}{}", stem.replace('.', "_"))),
                ] {
                    places.insert((format, module), whole.clone());
                }
                shapes.insert(var, shape);
            }
        }
        Self { shapes, places }
    }

    /// Every qualified weight a LoRA may target.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(|k| k.as_str())
    }
}

impl Family for SdxlLora {
    fn name(&self) -> &str {
        "sdxl"
    }

    fn place(&self, format: Format, module: &str) -> Option<Placement> {
        self.places.get(&(format, module.to_string())).cloned()
    }

    fn shape(&self, var: &str) -> Option<&[i64]> {
        self.shapes.get(var).map(|s| s.as_slice())
    }
}

/// The variables of an SDXL UNet and, optionally, its text encoders, qualified as [`SdxlLora`]
/// names them.
pub fn weights(unet: &Unet, text: Option<(&ClipTextModel, &ClipTextModel)>) -> Weights {
    let w = Weights::new().with(UNET, &unet.vs);
    match text {
        Some((a, b)) => w.with(TEXT_ENCODER, &a.vs).with(TEXT_ENCODER_2, &b.vs),
        None => w,
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::models::sdxl::unet::Config;

    #[test]
    fn kohya_original_and_diffusers_names_land_on_the_same_unet_variables() {
        let unet = Unet::new(&Config::tiny(), Device::Cpu, Kind::Float).unwrap();
        let te = clip::Config::tiny();
        let f = SdxlLora::new(&unet, &te, &te);
        let var = |format, module: &str| {
            f.place(format, module)
                .unwrap_or_else(|| panic!("{module}"))
                .slices[0]
                .var
                .clone()
        };
        let q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight";
        assert_eq!(
            var(
                Format::Peft,
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
            ),
            q
        );
        assert_eq!(
            var(
                Format::Kohya,
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
            ),
            q
        );
        let original = original_key(&unet.config, &q["unet.".len()..]);
        let kohya = format!(
            "lora_unet_{}",
            original
                .strip_prefix(ORIGINAL_PREFIX)
                .unwrap()
                .trim_end_matches(".weight")
                .replace('.', "_")
        );
        assert!(kohya.starts_with("lora_unet_input_blocks_"), "{kohya}");
        assert_eq!(var(Format::Kohya, &kohya), q);
        // A resnet's 3x3 conv: a 4-D target under its original name.
        let conv = "unet.down_blocks.0.resnets.0.conv1.weight";
        assert_eq!(var(Format::Kohya, "lora_unet_input_blocks_1_0_in_layers_2"), conv);
        assert_eq!(f.shape(conv).unwrap().len(), 4);
        for (format, module) in [
            (
                Format::Peft,
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj",
            ),
            (Format::Peft, "text_encoder.encoder.layers.1.self_attn.q_proj"),
            (
                Format::Kohya,
                "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
            ),
        ] {
            assert_eq!(
                var(format, module),
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.weight"
            );
        }
        assert_eq!(
            var(Format::Kohya, "lora_te2_text_model_encoder_layers_0_mlp_fc2"),
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.weight"
        );
        // Norms take no LoRA.
        assert!(
            f.place(Format::Peft, "unet.down_blocks.0.resnets.0.norm1")
                .is_none()
        );
        // Every target is a variable of the model.
        let w = weights(&unet, None);
        for v in f.variables().filter(|v| v.starts_with("unet.")) {
            assert_eq!(w.get(v).unwrap().size(), f.shape(v).unwrap(), "{v}");
        }
    }
}
