//! Key mapping from the diffusers `UNet2DConditionModel` names this crate uses onto the original
//! single-file layout (Stability's SGM code: `model.diffusion_model.input_blocks.*`,
//! `middle_block.*`, `output_blocks.*`, `time_embed.*`, `label_emb.*`, `out.*`), the inverse of
//! diffusers' `convert_ldm_unet_checkpoint`:
//!
//! * `input_blocks.0.0` is `conv_in`; then every down level is `layers_per_block` entries
//!   `input_blocks.k` (`.0` its resnet, `.1` its transformer) and, except on the last level, one
//!   entry whose `.0.op` is the downsampler;
//! * `middle_block.0` / `.1` / `.2` are the mid block's resnet, transformer, resnet;
//! * every up block is `layers_per_block + 1` entries `output_blocks.k` (`.0` resnet, `.1`
//!   transformer), the last one also holding the upsampler (`.1.conv`, or `.2.conv` after a
//!   transformer);
//! * resnets rename `norm1`/`conv1` to `in_layers.0`/`.2`, `norm2`/`conv2` to `out_layers.0`/`.3`,
//!   `time_emb_proj` to `emb_layers.1` and `conv_shortcut` to `skip_connection`; transformer
//!   contents keep their names.

use super::unet::Config;

/// Prefix of the UNet's tensors in a single-file checkpoint (next to `conditioner.*` and
/// `first_stage_model.*`, the text encoders and VAE).
pub const ORIGINAL_PREFIX: &str = "model.diffusion_model.";

/// Resnet sub-module names, diffusers -> original.
fn resnet_part(name: &str) -> &str {
    match name {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        other => other,
    }
}

/// The original single-file key (with [`ORIGINAL_PREFIX`]) of the diffusers-named variable
/// `name` of a UNet built from `c`. A name outside the layout maps to itself under the prefix,
/// so a strict load reports it as missing.
pub fn original_key(c: &Config, name: &str) -> String {
    format!(
        "{ORIGINAL_PREFIX}{}",
        original_suffix(c, name).unwrap_or_else(|| name.to_string())
    )
}

fn original_suffix(c: &Config, name: &str) -> Option<String> {
    let (stem, leaf) = name.rsplit_once('.')?;
    let fixed = match stem {
        "conv_in" => Some("input_blocks.0.0"),
        "time_embedding.linear_1" => Some("time_embed.0"),
        "time_embedding.linear_2" => Some("time_embed.2"),
        "add_embedding.linear_1" => Some("label_emb.0.0"),
        "add_embedding.linear_2" => Some("label_emb.0.2"),
        "conv_norm_out" => Some("out.0"),
        "conv_out" => Some("out.2"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(format!("{f}.{leaf}"));
    }
    let per_down = c.layers_per_block as usize + 1; // entries per down level (and per up block)
    let parts: Vec<&str> = name.split('.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    // `<kind>.<idx>.<rest...>` after the block prefix.
    let module = |kind: &str, rest: &[&str]| -> String {
        match kind {
            "resnets" => {
                let (first, tail) = rest.split_first().map(|(f, t)| (*f, t)).unwrap_or(("", &[]));
                std::iter::once(resnet_part(first))
                    .chain(tail.iter().copied())
                    .collect::<Vec<_>>()
                    .join(".")
            }
            _ => rest.join("."),
        }
    };
    match parts.as_slice() {
        ["down_blocks", b, kind, i, rest @ ..] => {
            let (b, i) = (index(b)?, index(i)?);
            let entry = 1 + b * per_down;
            Some(match *kind {
                "resnets" => format!("input_blocks.{}.0.{}", entry + i, module(kind, rest)),
                "attentions" => format!("input_blocks.{}.1.{}", entry + i, module(kind, rest)),
                "downsamplers" if i == 0 && rest.first() == Some(&"conv") => {
                    format!(
                        "input_blocks.{}.0.op.{}",
                        entry + per_down - 1,
                        rest[1..].join(".")
                    )
                }
                _ => return None,
            })
        }
        ["mid_block", kind, i, rest @ ..] => {
            let i = index(i)?;
            Some(match *kind {
                "resnets" => format!("middle_block.{}.{}", 2 * i, module(kind, rest)),
                "attentions" => format!("middle_block.{}.{}", 2 * i + 1, module(kind, rest)),
                _ => return None,
            })
        }
        ["up_blocks", b, kind, i, rest @ ..] => {
            let (b, i) = (index(b)?, index(i)?);
            let entry = b * per_down;
            Some(match *kind {
                "resnets" => format!("output_blocks.{}.0.{}", entry + i, module(kind, rest)),
                "attentions" => format!("output_blocks.{}.1.{}", entry + i, module(kind, rest)),
                "upsamplers" if i == 0 => {
                    let slot = if *c.up_attention.get(b)? { 2 } else { 1 };
                    format!("output_blocks.{}.{slot}.{}", entry + per_down - 1, rest.join("."))
                }
                _ => return None,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> String {
        original_key(&Config::sdxl_base(), name)
            .strip_prefix(ORIGINAL_PREFIX)
            .unwrap()
            .to_string()
    }

    /// Spot checks against the keys of sd_xl_base_1.0.safetensors.
    #[test]
    fn sdxl_base_names_map_to_the_original_single_file_keys() {
        for (diffusers, original) in [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("conv_norm_out.bias", "out.0.bias"),
            ("conv_out.weight", "out.2.weight"),
            (
                "down_blocks.0.resnets.0.norm1.weight",
                "input_blocks.1.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.resnets.1.conv2.bias",
                "input_blocks.2.0.out_layers.3.bias",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.1.resnets.0.time_emb_proj.weight",
                "input_blocks.4.0.emb_layers.1.weight",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q.weight",
                "input_blocks.5.1.transformer_blocks.1.attn1.to_q.weight",
            ),
            (
                "down_blocks.1.downsamplers.0.conv.bias",
                "input_blocks.6.0.op.bias",
            ),
            (
                "down_blocks.2.attentions.0.proj_in.weight",
                "input_blocks.7.1.proj_in.weight",
            ),
            (
                "mid_block.resnets.0.conv1.weight",
                "middle_block.0.in_layers.2.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj.weight",
                "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
            ),
            (
                "mid_block.resnets.1.norm2.weight",
                "middle_block.2.out_layers.0.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv_shortcut.bias",
                "output_blocks.2.0.skip_connection.bias",
            ),
            (
                "up_blocks.0.attentions.2.norm.weight",
                "output_blocks.2.1.norm.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.1.attentions.0.proj_out.bias",
                "output_blocks.3.1.proj_out.bias",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.2.resnets.2.time_emb_proj.bias",
                "output_blocks.8.0.emb_layers.1.bias",
            ),
        ] {
            assert_eq!(key(diffusers), original, "{diffusers}");
        }
    }

    /// An up block without transformers keeps its upsampler at `.1.conv`.
    #[test]
    fn an_upsampler_after_a_plain_up_block_is_entry_one() {
        let mut c = Config::sdxl_base();
        c.up_attention = vec![false, true, false];
        let k = original_key(&c, "up_blocks.0.upsamplers.0.conv.weight");
        assert_eq!(k, format!("{ORIGINAL_PREFIX}output_blocks.2.1.conv.weight"));
    }

    /// Names outside the layout are not silently mapped onto a real key.
    #[test]
    fn unknown_names_map_to_themselves() {
        assert_eq!(key("down_blocks.0.norm.weight"), "down_blocks.0.norm.weight");
        assert_eq!(key("foo"), "foo");
    }
}
