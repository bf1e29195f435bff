//! A parallel plan: how one image is split over a node's GPUs.

use std::fmt;
use std::str::FromStr;

use super::attention::TextMode;
use super::comm::Mesh;

/// The degrees of each strategy. The product of `cfg` and `pipefusion` (or `ulysses * ring`, or
/// `patch`) is the number of GPUs one image uses; `dp` groups of that many serve different
/// images of a batch. Transformer models (Flux) split the token sequence (`ulysses`, `ring`,
/// `pipefusion`; [`Plan::validate`]); UNet models (SDXL) split the latent's rows (`patch`;
/// [`Plan::validate_unet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Data-parallel groups (images of a batch spread over groups).
    pub dp: usize,
    /// CFG parallel: 2 = the positive and negative prompts on different GPU groups (true CFG
    /// only; a plan with `cfg = 2` runs a request without true CFG on half of its GPUs idle).
    pub cfg: usize,
    /// Ulysses degree (divides the head count).
    pub ulysses: usize,
    /// Ring degree.
    pub ring: usize,
    /// PipeFusion stages (excludes `ulysses`/`ring` > 1).
    pub pipefusion: usize,
    /// PipeFusion patches per image (>= stages).
    pub patches: usize,
    /// PipeFusion warm-up steps run with fresh K/V (the full sequence).
    pub warmup_steps: usize,
    /// Patch parallel: the UNet's latent split into this many row bands per CFG branch (see
    /// [`super::spatial`]; UNet models only, alone or with `cfg`).
    #[serde(default = "one")]
    pub patch: usize,
    /// Text layout override (`None` = split in balanced slices, replicated when there are fewer text
    /// tokens than ranks).
    pub text: Option<TextMode>,
    /// Patch-parallel VAE decode: every rank of the first CFG branch decodes a band of rows
    /// (see [`super::vae`]). Only takes effect when one image's sequence spans more than one
    /// rank ([`Plan::vae_split`]); `false` decodes on the group leader alone.
    #[serde(default = "yes")]
    pub vae_parallel: bool,
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

impl Default for Plan {
    fn default() -> Self {
        Self::SINGLE
    }
}

impl Plan {
    pub const SINGLE: Plan = Plan {
        dp: 1,
        cfg: 1,
        ulysses: 1,
        ring: 1,
        pipefusion: 1,
        patches: 1,
        warmup_steps: 1,
        patch: 1,
        text: None,
        vae_parallel: true,
    };

    /// GPUs one image uses.
    pub fn group_size(&self) -> usize {
        self.mesh().world()
    }

    /// GPUs the plan uses in all.
    pub fn world(&self) -> usize {
        self.dp * self.group_size()
    }

    pub fn mesh(&self) -> Mesh {
        Mesh {
            cfg: self.cfg,
            pipe: self.pipefusion,
            ring: self.ring,
            ulysses: self.ulysses,
            patch: self.patch,
        }
    }

    /// Whether the VAE decode is split over the ranks of one CFG branch.
    pub fn vae_split(&self) -> bool {
        self.vae_parallel && self.mesh().sp() > 1
    }

    /// Checks the plan against the model (`heads`) and the GPUs available.
    pub fn validate(&self, heads: i64, gpus: usize) -> Result<(), String> {
        let all = [
            self.dp,
            self.cfg,
            self.ulysses,
            self.ring,
            self.pipefusion,
            self.patches,
            self.patch,
        ];
        if all.contains(&0) {
            return Err(format!("{self}: every degree must be at least 1"));
        }
        if self.patch > 1 {
            return Err(format!(
                "{self}: patch parallelism splits a UNet's latent rows; a transformer's plans split \
                 its tokens (ulysses, ring, pipefusion)"
            ));
        }
        if self.cfg > 2 {
            return Err(format!("{self}: cfg degree is 1 or 2"));
        }
        if heads % self.ulysses as i64 != 0 {
            return Err(format!(
                "{self}: ulysses degree {} does not divide the {heads} attention heads",
                self.ulysses
            ));
        }
        if self.pipefusion > 1 && !super::PIPEFUSION_AVAILABLE {
            return Err(format!("{self}: PipeFusion is not available in this build"));
        }
        if self.pipefusion > 1 && (self.ulysses > 1 || self.ring > 1) {
            return Err(format!(
                "{self}: PipeFusion is not combined with ulysses/ring here"
            ));
        }
        if self.pipefusion > 1 && self.warmup_steps == 0 {
            return Err(format!(
                "{self}: PipeFusion needs at least one warm-up step (it fills the K/V buffers)"
            ));
        }
        if self.pipefusion > 1 && self.patches < self.pipefusion {
            return Err(format!(
                "{self}: PipeFusion needs at least as many patches ({}) as stages ({})",
                self.patches, self.pipefusion
            ));
        }
        if self.world() > gpus {
            return Err(format!(
                "{self}: needs {} GPUs, the node has {gpus}",
                self.world()
            ));
        }
        Ok(())
    }

    /// Checks the plan for a UNet model (SDXL): data, CFG and patch parallelism only (its
    /// attention runs at several resolutions and head counts; the sequence strategies and
    /// PipeFusion's stages are the transformer's).
    pub fn validate_unet(&self, gpus: usize) -> Result<(), String> {
        if [self.dp, self.cfg, self.patch].contains(&0) {
            return Err(format!("{self}: every degree must be at least 1"));
        }
        if self.cfg > 2 {
            return Err(format!("{self}: cfg degree is 1 or 2"));
        }
        if self.ulysses > 1 || self.ring > 1 || self.pipefusion > 1 {
            return Err(format!(
                "{self}: a UNet splits its latent rows (patch=N, with cfg=2), not its tokens \
                 (ulysses, ring, pipefusion)"
            ));
        }
        if self.world() > gpus {
            return Err(format!(
                "{self}: needs {} GPUs, the node has {gpus}",
                self.world()
            ));
        }
        Ok(())
    }

    /// Every valid UNet plan for `gpus` GPUs used by one image (dp = 1): all of them patch
    /// parallel, and with CFG parallel when the request has classifier-free guidance.
    pub fn unet_candidates(gpus: usize, cfg_guidance: bool) -> Vec<Plan> {
        let cfgs: &[usize] = if cfg_guidance { &[1, 2] } else { &[1] };
        cfgs.iter()
            .filter(|&&cfg| gpus.is_multiple_of(cfg))
            .map(|&cfg| Plan {
                cfg,
                patch: gpus / cfg,
                ..Plan::SINGLE
            })
            .filter(|p| p.validate_unet(gpus).is_ok())
            .collect()
    }

    /// Every valid plan for `gpus` GPUs used by one image (dp = 1), for autotuning.
    pub fn candidates(heads: i64, gpus: usize, true_cfg: bool) -> Vec<Plan> {
        let mut out = Vec::new();
        let cfgs: &[usize] = if true_cfg { &[1, 2] } else { &[1] };
        for &cfg in cfgs {
            if !gpus.is_multiple_of(cfg) {
                continue;
            }
            let sp = gpus / cfg;
            for ulysses in (1..=sp).filter(|u| sp.is_multiple_of(*u)) {
                let p = Plan {
                    cfg,
                    ulysses,
                    ring: sp / ulysses,
                    ..Plan::SINGLE
                };
                if p.validate(heads, gpus).is_ok() {
                    out.push(p);
                }
            }
            if sp > 1 && super::PIPEFUSION_AVAILABLE {
                out.push(Plan {
                    cfg,
                    pipefusion: sp,
                    patches: sp,
                    ..Plan::SINGLE
                });
            }
        }
        out
    }
}

impl fmt::Display for Plan {
    /// `ulysses=2,ring=2,cfg=2` style; degrees of 1 are left out (`single` when all are).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (name, v) in [
            ("dp", self.dp),
            ("cfg", self.cfg),
            ("ulysses", self.ulysses),
            ("ring", self.ring),
            ("pipefusion", self.pipefusion),
            ("patch", self.patch),
        ] {
            if v != 1 {
                parts.push(format!("{name}={v}"));
            }
        }
        if self.pipefusion > 1 {
            parts.push(format!("patches={}", self.patches));
            parts.push(format!("warmup={}", self.warmup_steps));
        }
        match self.text {
            Some(TextMode::Split) => parts.push("text=split".into()),
            Some(TextMode::Replicated) => parts.push("text=replicated".into()),
            None => {}
        }
        if !self.vae_parallel {
            parts.push("vae=single".into());
        }
        if parts.is_empty() {
            f.write_str("single")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

impl FromStr for Plan {
    type Err = String;

    /// Parses [`Plan`]'s display form, e.g. `ulysses=4`, `ring=2,ulysses=2`, `cfg=2,ulysses=2`,
    /// `pipefusion=4,patches=8,warmup=2`, `ulysses=4,vae=single`, `cfg=2,patch=4`, `single`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut p = Plan::SINGLE;
        let s = s.trim();
        if s.is_empty() || s == "single" {
            return Ok(p);
        }
        let mut patches_set = false;
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("plan item {item:?} is not name=value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k == "text" {
                p.text = Some(match v {
                    "split" => TextMode::Split,
                    "replicated" => TextMode::Replicated,
                    _ => return Err(format!("text must be split or replicated, got {v:?}")),
                });
                continue;
            }
            if k == "vae" {
                p.vae_parallel = match v {
                    "parallel" => true,
                    "single" => false,
                    _ => return Err(format!("vae must be parallel or single, got {v:?}")),
                };
                continue;
            }
            let n: usize = v.parse().map_err(|_| format!("{k}={v}: not a number"))?;
            match k {
                "dp" => p.dp = n,
                "cfg" => p.cfg = n,
                "ulysses" => p.ulysses = n,
                "ring" => p.ring = n,
                "pipefusion" => p.pipefusion = n,
                "patches" => {
                    p.patches = n;
                    patches_set = true;
                }
                "warmup" => p.warmup_steps = n,
                "patch" => p.patch = n,
                _ => return Err(format!("unknown plan item {k:?}")),
            }
        }
        if p.pipefusion > 1 && !patches_set {
            p.patches = p.pipefusion;
        }
        Ok(p)
    }
}

/// What a model can split, as its plans see it (the model family states it; plans are checked
/// and shrunk against it without knowing the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splits {
    /// A transformer over tokens (Flux): Ulysses over its `heads`, Ring over the token axis,
    /// PipeFusion over its blocks, CFG parallel for true CFG.
    Tokens { heads: i64 },
    /// A convolutional UNet over latent rows (SDXL): row bands (`patch`), CFG parallel.
    Rows,
}

impl Splits {
    /// Whether `plan` can run such a model on `gpus` devices (the reason if not).
    pub fn validate(&self, plan: &Plan, gpus: usize) -> Result<(), String> {
        match self {
            Splits::Tokens { heads } => plan.validate(*heads, gpus),
            Splits::Rows => plan.validate_unet(gpus),
        }
    }

    /// The plans worth measuring on `gpus` devices for the model's usual request: Flux without
    /// true CFG (no CFG parallel), SDXL with classic CFG (CFG parallel included).
    pub fn candidates(&self, gpus: usize) -> Vec<Plan> {
        match self {
            Splits::Tokens { heads } => Plan::candidates(*heads, gpus, false),
            Splits::Rows => Plan::unet_candidates(gpus, true),
        }
    }

    /// The largest plan of `requested`'s strategy family that fits `gpus` devices (after a GPU
    /// was quarantined); the single-device plan when nothing else does.
    pub fn shrink(&self, requested: &Plan, gpus: usize) -> Plan {
        match self {
            Splits::Tokens { heads } => shrink_tokens(requested, gpus, *heads),
            Splits::Rows => shrink_rows(requested, gpus),
        }
    }
}

/// Row bands: the largest band count that fits, keeping CFG parallel while two ranks per band
/// fit.
fn shrink_rows(r: &Plan, n: usize) -> Plan {
    if r.world() <= n {
        return *r;
    }
    let single = Plan {
        text: r.text,
        ..Plan::SINGLE
    };
    let per_group = n / r.dp.max(1);
    let (dp, m) = if per_group >= 1 {
        (r.dp, per_group)
    } else {
        (1, n.max(1))
    };
    for cfg in [r.cfg, 1] {
        let patch = m / cfg;
        if patch >= 1 {
            let cand = Plan {
                dp,
                cfg,
                patch,
                ..single
            };
            if cand.validate_unet(n).is_ok() {
                return cand;
            }
        }
    }
    single
}

/// The largest plan of `r`'s strategy family that fits `n` devices (a model with `heads`
/// attention heads: what Ulysses degrees must divide).
fn shrink_tokens(r: &Plan, n: usize, heads: i64) -> Plan {
    let single = Plan {
        text: r.text,
        ..Plan::SINGLE
    };
    if r.world() <= n {
        return *r;
    }
    let per_group = n / r.dp.max(1);
    let (dp, m) = if per_group >= 1 {
        (r.dp, per_group)
    } else {
        (1, n.max(1))
    };
    for g in (1..=m).rev() {
        let cand = if r.pipefusion > 1 {
            Plan {
                dp,
                pipefusion: g,
                patches: r.patches.max(g),
                ..*r
            }
        } else if r.ulysses > 1 {
            // Keep Ulysses as large as divides the heads, the rest as Ring.
            let u = (1..=g)
                .rev()
                .find(|u| g % u == 0 && heads % *u as i64 == 0)
                .unwrap_or(1);
            Plan {
                dp,
                cfg: 1,
                ulysses: u,
                ring: g / u,
                ..*r
            }
        } else {
            Plan {
                dp,
                cfg: 1,
                ring: g,
                ..*r
            }
        };
        let cand = if cand.pipefusion <= 1 && cand.ulysses * cand.ring == 1 {
            Plan { dp, ..single }
        } else {
            cand
        };
        if cand.validate(heads, n).is_ok() {
            return cand;
        }
    }
    single
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_through_their_text_form() {
        for s in [
            "single",
            "ulysses=4",
            "cfg=2,ulysses=2",
            "ring=2,ulysses=2",
            "patch=4",
            "cfg=2,patch=2",
        ] {
            let p: Plan = s.parse().unwrap();
            assert_eq!(p.to_string().parse::<Plan>().unwrap(), p, "{s}");
        }
        let p: Plan = "pipefusion=4".parse().unwrap();
        assert_eq!(p.patches, 4);
        assert_eq!(p.to_string(), "pipefusion=4,patches=4,warmup=1");
        assert!("ulysses=x".parse::<Plan>().is_err());
        assert!("bogus=2".parse::<Plan>().is_err());
    }

    #[test]
    fn vae_decode_is_split_by_default_when_the_sequence_is() {
        let p: Plan = "ulysses=2".parse().unwrap();
        assert!(p.vae_parallel && p.vae_split());
        assert_eq!(p.to_string(), "ulysses=2");
        assert_eq!("ulysses=2,vae=parallel".parse::<Plan>().unwrap(), p);
        let p: Plan = "ring=2,vae=single".parse().unwrap();
        assert!(!p.vae_parallel && !p.vae_split());
        assert_eq!(p.to_string(), "ring=2,vae=single");
        assert_eq!(p.to_string().parse::<Plan>().unwrap(), p);
        // One rank per sequence: nothing to split (CFG branches decode the same image).
        assert!(!Plan::SINGLE.vae_split());
        assert!(!"cfg=2".parse::<Plan>().unwrap().vae_split());
        assert!(
            "vae=both"
                .parse::<Plan>()
                .unwrap_err()
                .contains("parallel or single")
        );
        // Plans serialised before the field existed deserialise with the default.
        let old = r#"{"dp":1,"cfg":1,"ulysses":2,"ring":1,"pipefusion":1,"patches":1,"warmup_steps":1,"text":null}"#;
        assert!(serde_json::from_str::<Plan>(old).unwrap().vae_parallel);
    }

    #[test]
    fn invalid_plans_are_rejected_with_the_reason() {
        let p: Plan = "ulysses=5".parse().unwrap();
        assert!(p.validate(24, 8).unwrap_err().contains("does not divide the 24"));
        let p: Plan = "ulysses=4".parse().unwrap();
        assert!(p.validate(24, 2).unwrap_err().contains("needs 4 GPUs"));
        let p: Plan = "pipefusion=2,ulysses=2".parse().unwrap();
        assert!(p.validate(24, 4).is_err());
        let pf = usize::from(super::super::PIPEFUSION_AVAILABLE);
        assert_eq!(Plan::candidates(24, 4, false).len(), 3 + pf); // u4, u2r2, r4 (+ pipefusion4)
        assert_eq!(Plan::candidates(24, 4, true).len(), 3 + pf + 2 + pf); // + cfg2 x (u2, r2, pf2)
    }

    #[test]
    fn patch_plans_are_unet_plans_only() {
        let p: Plan = "cfg=2,patch=2".parse().unwrap();
        assert_eq!((p.cfg, p.patch, p.group_size()), (2, 2, 4));
        assert_eq!(p.to_string(), "cfg=2,patch=2");
        assert!(p.vae_split());
        assert_eq!(p.validate_unet(4), Ok(()));
        assert!(p.validate_unet(2).unwrap_err().contains("needs 4 GPUs"));
        assert!(p.validate(24, 8).unwrap_err().contains("UNet"));
        let u: Plan = "ulysses=2".parse().unwrap();
        assert!(u.validate_unet(8).unwrap_err().contains("latent rows"));
        assert!("pipefusion=2".parse::<Plan>().unwrap().validate_unet(8).is_err());
        let names = |ps: Vec<Plan>| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(Plan::unet_candidates(4, true)),
            ["patch=4", "cfg=2,patch=2"]
        );
        assert_eq!(names(Plan::unet_candidates(2, false)), ["patch=2"]);
        assert_eq!(names(Plan::unet_candidates(3, true)), ["patch=3"]);
        // Plans serialised before the field existed deserialise without patch parallelism.
        let old = r#"{"dp":1,"cfg":2,"ulysses":1,"ring":1,"pipefusion":1,"patches":1,"warmup_steps":1,"text":null}"#;
        assert_eq!(serde_json::from_str::<Plan>(old).unwrap().patch, 1);
    }
}
