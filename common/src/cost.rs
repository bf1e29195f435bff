//! The first cost model: how expensive a job is, and which class (work queue) serves it.
//!
//! cost = image tokens x steps x model factor, where image tokens = (width/16) x (height/16) is
//! the transformer's sequence length for Flux (8x VAE downsampling, 2x2 latent patches). Classes
//! are ascending upper bounds on the cost; the last class is unbounded.

/// Relative per-token-step cost of a model (Flux.1-dev = 1.0).
pub fn model_factor(model: &str) -> f64 {
    match model {
        // Same transformer; schnell has no guidance embedding (negligible).
        "flux-dev" | "flux-schnell" => 1.0,
        _ => 1.0,
    }
}

/// Transformer sequence length of the image for a width x height request.
pub fn image_tokens(width: u32, height: u32) -> u64 {
    u64::from(width / 16) * u64::from(height / 16)
}

/// The job's cost in token-steps (steps as resolved, i.e. after model defaults).
pub fn job_cost(model: &str, width: u32, height: u32, steps: u32) -> u64 {
    let raw = image_tokens(width, height) as f64 * f64::from(steps) * model_factor(model);
    raw.round() as u64
}

pub(crate) fn valid_class_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Ordered classes with their upper cost bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassTable {
    /// (name, inclusive upper bound); the last entry has `None`.
    classes: Vec<(String, Option<u64>)>,
}

impl Default for ClassTable {
    fn default() -> Self {
        Self::parse("small=50000,medium=250000,large=1500000,xlarge").expect("default class table parses")
    }
}

impl ClassTable {
    /// Parses `small=50000,medium=250000,large=1500000,xlarge`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut classes = Vec::new();
        let parts: Vec<&str> = s.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err("at least one class is needed".into());
        }
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let (name, bound) = match part.split_once('=') {
                Some((n, b)) => {
                    let b: u64 = b
                        .trim()
                        .parse()
                        .map_err(|_| format!("bound of class {n:?} is not an integer"))?;
                    (n.trim(), Some(b))
                }
                None => (*part, None),
            };
            if !valid_class_name(name) {
                return Err(format!(
                    "class name {name:?} must be 1-32 characters of [a-z0-9_-]"
                ));
            }
            if classes.iter().any(|(n, _)| n == name) {
                return Err(format!("class {name:?} appears twice"));
            }
            match (last, bound) {
                (false, None) => {
                    return Err(format!(
                        "class {name:?} needs an upper bound (only the last class has none)"
                    ));
                }
                (true, Some(_)) => return Err(format!("the last class {name:?} must have no bound")),
                _ => {}
            }
            if let (Some(b), Some((_, Some(prev)))) = (bound, classes.last()) {
                if b <= *prev {
                    return Err(format!("bounds must increase: {name:?}={b} is not above {prev}"));
                }
            }
            classes.push((name.to_string(), bound));
        }
        Ok(Self { classes })
    }

    pub fn names(&self) -> Vec<&str> {
        self.classes.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The class serving a job of this cost.
    pub fn classify(&self, cost: u64) -> &str {
        for (name, bound) in &self.classes {
            match bound {
                Some(b) if cost <= *b => return name,
                None => return name,
                _ => {}
            }
        }
        &self.classes.last().expect("table is never empty").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_sends_big_images_to_bigger_classes() {
        let t = ClassTable::default();
        assert_eq!(t.classify(image_tokens(512, 512) * 4), "small"); // schnell 512²: 4k token-steps
        assert_eq!(t.classify(image_tokens(1024, 1024) * 28), "medium"); // 115k
        assert_eq!(t.classify(image_tokens(2048, 2048) * 28), "large"); // 459k
        assert_eq!(t.classify(image_tokens(4096, 4096) * 50), "xlarge"); // 3.3M
        assert_eq!(t.classify(50_000), "small");
        assert_eq!(t.classify(50_001), "medium");
    }

    #[test]
    fn malformed_tables_are_rejected() {
        assert!(ClassTable::parse("").is_err());
        assert!(ClassTable::parse("a=10,b").is_ok());
        assert!(ClassTable::parse("a,b").is_err());
        assert!(ClassTable::parse("a=10,b=5,c").is_err());
        assert!(ClassTable::parse("a=10,a").is_err());
        assert!(ClassTable::parse("a=10,b=20").is_err());
        assert!(ClassTable::parse("A=10,b").is_err());
    }
}
