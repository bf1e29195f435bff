//! Flux's LoRA key mapping ([`FluxLora`]): adapter modules in either format onto the engine's
//! variables, which keep the original (BFL) layout (see [`crate::flux::transformer_keys`]):
//!
//! * diffusers/PEFT `transformer.transformer_blocks.N.attn.to_q` is rows `0..h` of
//!   `double_blocks.N.img_attn.qkv` (`to_k`: `h..2h`, `to_v`: `2h..3h`; `add_*_proj` likewise in
//!   `txt_attn.qkv`); a single block's `attn.to_q/k/v` and `proj_mlp` are rows of `linear1`
//!   (`0..h`, `h..2h`, `2h..3h`, `3h..3h + mlp`); `norm_out.linear` stores (scale, shift) where
//!   `final_layer.adaLN_modulation.1` holds (shift, scale), so its two halves land crosswise;
//!   every other module is one variable, renamed;
//! * kohya/sd-scripts names the original-layout module (`lora_unet_double_blocks_0_img_attn_qkv`,
//!   fused q/k/v included), so its product lands on the whole variable;
//! * the CLIP text encoder (`text_encoder.text_model.encoder.layers.N.self_attn.q_proj`, also
//!   without `text_model.` as transformers 5 names it; kohya `lora_te1_…` or `lora_te_…`) keeps
//!   transformers' names. T5 (`text_encoder_2`, kohya `lora_te2_`/`lora_te3_`) takes no LoRA, as
//!   in diffusers: such keys are reported as matching nothing.
//!
//! Variables are qualified by component: `transformer.<name>`, `text_encoder.<name>`.

use std::collections::{BTreeMap, HashMap};

use super::{Family, Format, Placement, Slice, Weights};
use crate::flux::clip::{self, ClipTextModel};
use crate::flux::transformer::{self, Flux};
use crate::flux::transformer_keys::diffusers_source;
use crate::flux::weights::Source;

pub const TRANSFORMER: &str = "transformer";
pub const TEXT_ENCODER: &str = "text_encoder";

/// The shapes of the Flux transformer's Linear weights (original-layout names), as
/// [`Flux::new`] creates them.
pub fn transformer_linear_shapes(c: &transformer::Config) -> BTreeMap<String, Vec<i64>> {
    let (h, m) = (c.hidden_size, c.mlp_hidden());
    let mut s = BTreeMap::new();
    let mut add = |name: String, out: i64, inp: i64| {
        s.insert(format!("{name}.weight"), vec![out, inp]);
    };
    add("img_in".into(), h, c.in_channels);
    add("txt_in".into(), h, c.context_in_dim);
    let mut embedders = vec![("time_in", 256), ("vector_in", c.vec_in_dim)];
    if c.guidance_embed {
        embedders.push(("guidance_in", 256));
    }
    for (e, inp) in embedders {
        add(format!("{e}.in_layer"), h, inp);
        add(format!("{e}.out_layer"), h, h);
    }
    for i in 0..c.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            add(format!("{p}_mod.lin"), 6 * h, h);
            add(format!("{p}_attn.qkv"), 3 * h, h);
            add(format!("{p}_attn.proj"), h, h);
            add(format!("{p}_mlp.0"), m, h);
            add(format!("{p}_mlp.2"), h, m);
        }
    }
    for i in 0..c.depth_single_blocks {
        let p = format!("single_blocks.{i}");
        add(format!("{p}.linear1"), 3 * h + m, h);
        add(format!("{p}.linear2"), h, h + m);
        add(format!("{p}.modulation.lin"), 3 * h, h);
    }
    add("final_layer.linear".into(), c.in_channels, h);
    add("final_layer.adaLN_modulation.1".into(), 2 * h, h);
    s
}

/// The shapes of the CLIP text encoder's Linear weights, as [`ClipTextModel::new`] creates them.
pub fn clip_linear_shapes(c: &clip::Config) -> BTreeMap<String, Vec<i64>> {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut s = BTreeMap::new();
    for i in 0..c.num_hidden_layers {
        let l = format!("text_model.encoder.layers.{i}");
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            s.insert(format!("{l}.self_attn.{p}.weight"), vec![h, h]);
        }
        s.insert(format!("{l}.mlp.fc1.weight"), vec![f, h]);
        s.insert(format!("{l}.mlp.fc2.weight"), vec![h, f]);
    }
    s
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct FluxLora {
    shapes: BTreeMap<String, Vec<i64>>,
    places: HashMap<(Format, String), Placement>,
}

impl FluxLora {
    /// The mapping for a transformer of config `transformer` and, if LoRAs may target it, a CLIP
    /// text encoder of config `clip`.
    pub fn new(transformer: &transformer::Config, clip: Option<&clip::Config>) -> Self {
        let mut shapes = BTreeMap::new();
        let mut places = HashMap::new();
        for (name, shape) in transformer_linear_shapes(transformer) {
            let var = format!("{TRANSFORMER}.{name}");
            let (rows, cols) = (shape[0], shape[1]);
            let stem = name.trim_end_matches(".weight");
            places.insert(
                (Format::Kohya, format!("lora_unet_{}", stem.replace('.', "_"))),
                Placement::whole(&var, rows),
            );
            let module = |k: &str| format!("{TRANSFORMER}.{}", k.trim_end_matches(".weight"));
            match diffusers_source(&name) {
                Source::Key(k) => {
                    places.insert((Format::Peft, module(&k)), Placement::whole(&var, rows));
                }
                // q, k and v are square (h = `cols` rows each); the last part (a single block's
                // `proj_mlp`) takes the rest.
                Source::Concat(ks) => {
                    let mut dst = 0;
                    for (j, k) in ks.iter().enumerate() {
                        let len = if j + 1 == ks.len() { rows - dst } else { cols };
                        places.insert(
                            (Format::Peft, module(k)),
                            Placement {
                                out: len,
                                slices: vec![Slice {
                                    var: var.clone(),
                                    src: 0,
                                    dst,
                                    len,
                                }],
                            },
                        );
                        dst += len;
                    }
                }
                Source::SwapHalves(k) => {
                    let half = rows / 2;
                    let slice = |src, dst| Slice {
                        var: var.clone(),
                        src,
                        dst,
                        len: half,
                    };
                    places.insert(
                        (Format::Peft, module(&k)),
                        Placement {
                            out: rows,
                            slices: vec![slice(0, half), slice(half, 0)],
                        },
                    );
                }
                // Flux's diffusers mapping yields none of these (they serve SDXL's single-file
                // layout); a PEFT key aimed at such a weight would be reported as matching nothing.
                Source::Rows { .. } | Source::Transposed(_) | Source::Squeezed(_) => {}
            }
            shapes.insert(var, shape);
        }
        for (name, shape) in clip.map(clip_linear_shapes).unwrap_or_default() {
            let var = format!("{TEXT_ENCODER}.{name}");
            let stem = name.trim_end_matches(".weight");
            let whole = Placement::whole(&var, shape[0]);
            let flat = stem.replace('.', "_");
            let bare = stem.strip_prefix("text_model.").unwrap_or(stem);
            for (format, module) in [
                (Format::Peft, format!("{TEXT_ENCODER}.{stem}")),
                (Format::Peft, format!("{TEXT_ENCODER}.{bare}")),
                (Format::Kohya, format!("lora_te1_{flat}")),
                (Format::Kohya, format!("lora_te_{flat}")),
            ] {
                places.insert((format, module), whole.clone());
            }
            shapes.insert(var, shape);
        }
        Self { shapes, places }
    }

    /// Every qualified weight a LoRA may target.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(|k| k.as_str())
    }

    /// Every module name `format` knows (aliases included: a CLIP module under both of its
    /// PEFT and kohya names), with its placement, sorted by name.
    pub fn modules(&self, format: Format) -> Vec<(&str, &Placement)> {
        let mut m: Vec<_> = self
            .places
            .iter()
            .filter(|((f, _), _)| *f == format)
            .map(|((_, name), p)| (name.as_str(), p))
            .collect();
        m.sort_by_key(|(n, _)| *n);
        m
    }
}

impl Family for FluxLora {
    fn name(&self) -> &str {
        "flux"
    }

    fn place(&self, format: Format, module: &str) -> Option<Placement> {
        self.places.get(&(format, module.to_string())).cloned()
    }

    fn shape(&self, var: &str) -> Option<&[i64]> {
        self.shapes.get(var).map(|s| s.as_slice())
    }
}

/// The variables of a Flux transformer (the whole model or a PipeFusion stage's part) and,
/// optionally, its CLIP text encoder, qualified as [`FluxLora`] names them.
pub fn weights(transformer: &Flux, clip: Option<&ClipTextModel>) -> Weights {
    let w = Weights::new().with(TRANSFORMER, &transformer.vs);
    match clip {
        Some(c) => w.with(TEXT_ENCODER, &c.vs),
        None => w,
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    /// The analytic shape lists agree with the variables the models create, so that a stage of
    /// a PipeFusion plan validates against exactly the whole model's weights.
    #[test]
    fn shape_lists_match_the_models_variables() {
        let mut c = transformer::Config::tiny();
        c.depth = 2;
        let model = Flux::new(&c, Device::Cpu, Kind::Float).unwrap();
        let vars = model.vs.variables();
        let mut linear: Vec<(String, Vec<i64>)> = vars
            .iter()
            .filter(|(n, t)| n.ends_with(".weight") && t.dim() == 2)
            .map(|(n, t)| (n.clone(), t.size()))
            .collect();
        linear.sort();
        let want: Vec<_> = transformer_linear_shapes(&c).into_iter().collect();
        assert_eq!(linear, want);
        let cc = clip::Config::tiny();
        let clip = ClipTextModel::new(&cc, Device::Cpu, Kind::Float).unwrap();
        let mut linear: Vec<(String, Vec<i64>)> = clip
            .vs
            .variables()
            .iter()
            .filter(|(n, t)| n.ends_with(".weight") && t.dim() == 2 && !n.contains("embedding"))
            .map(|(n, t)| (n.clone(), t.size()))
            .collect();
        linear.sort();
        assert_eq!(linear, clip_linear_shapes(&cc).into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn diffusers_modules_land_on_rows_of_the_fused_original_layout_weights() {
        let c = transformer::Config::tiny();
        let (h, m) = (c.hidden_size, c.mlp_hidden());
        let f = FluxLora::new(&c, Some(&clip::Config::tiny()));
        let rows = |module: &str| {
            let p = f.place(Format::Peft, module).unwrap();
            p.slices
                .iter()
                .map(|s| (s.var.clone(), s.src, s.dst, s.len))
                .collect::<Vec<_>>()
        };
        let qkv = "transformer.double_blocks.0.img_attn.qkv.weight".to_string();
        assert_eq!(
            rows("transformer.transformer_blocks.0.attn.to_k"),
            [(qkv, 0, h, h)]
        );
        let l1 = "transformer.single_blocks.1.linear1.weight".to_string();
        assert_eq!(
            rows("transformer.single_transformer_blocks.1.proj_mlp"),
            [(l1.clone(), 0, 3 * h, m)]
        );
        assert_eq!(
            rows("transformer.single_transformer_blocks.1.attn.to_v"),
            [(l1, 0, 2 * h, h)]
        );
        let ada = "transformer.final_layer.adaLN_modulation.1.weight".to_string();
        assert_eq!(
            rows("transformer.norm_out.linear"),
            [(ada.clone(), 0, h, h), (ada, h, 0, h)]
        );
        assert_eq!(
            rows("transformer.time_text_embed.guidance_embedder.linear_2"),
            [("transformer.guidance_in.out_layer.weight".into(), 0, 0, h)]
        );
        let q = "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.weight";
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
            assert_eq!(f.place(format, module).unwrap().slices[0].var, q, "{module}");
        }
        let k = f
            .place(Format::Kohya, "lora_unet_double_blocks_0_txt_attn_qkv")
            .unwrap();
        assert_eq!((k.out, k.slices.len()), (3 * h, 1));
        assert!(
            f.place(Format::Kohya, "lora_te2_encoder_block_0_layer_0_SelfAttention_q")
                .is_none()
        );
        assert!(
            f.place(Format::Peft, "transformer.transformer_blocks.1.attn.to_q")
                .is_none()
        );
        // The tiny CLIP's 2 layers hold 6 Linear weights each.
        assert_eq!(f.variables().count(), transformer_linear_shapes(&c).len() + 12);
    }
}
