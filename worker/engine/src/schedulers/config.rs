//! Reading diffusers `scheduler_config.json` files: typed getters that default like diffusers'
//! `__init__` arguments (a missing key or `null` takes the default), ignore keys a class does not
//! take (as diffusers' `from_config` does), and turn a wrong type or unsupported value into an
//! [`EngineError::Load`] naming the key and the value.

use serde_json::{Map, Value};

use crate::EngineError;

/// The diffusers scheduler classes this module reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    EulerDiscrete,
    EulerAncestralDiscrete,
    DpmSolverMultistep,
    FlowMatchEulerDiscrete,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::FlowMatchEulerDiscrete,
    ];

    /// The diffusers class name (`_class_name` in a config).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::FlowMatchEulerDiscrete => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// The kind for a diffusers class name.
    pub fn from_class_name(name: &str) -> Option<SchedulerKind> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }
}

/// A config object being read, with the name of its source for messages.
pub struct Reader<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
}

impl<'a> Reader<'a> {
    pub fn new(v: &'a Value, source: &'a str) -> Result<Self, EngineError> {
        let map = v.as_object().ok_or_else(|| {
            EngineError::Load(format!("{source}: a scheduler config must be a JSON object"))
        })?;
        Ok(Self { map, source })
    }

    /// The `_class_name` as a [`SchedulerKind`].
    pub fn class_name(&self) -> Result<SchedulerKind, EngineError> {
        let name = self
            .get("_class_name")
            .ok_or_else(|| self.err("_class_name is missing: cannot tell which scheduler to build"))?;
        let name = name
            .as_str()
            .ok_or_else(|| self.bad("_class_name", name, "a string"))?;
        SchedulerKind::from_class_name(name).ok_or_else(|| {
            let known: Vec<_> = SchedulerKind::ALL.iter().map(|k| k.class_name()).collect();
            self.err(&format!(
                "_class_name = {name:?} is not supported (supported: {})",
                known.join(", ")
            ))
        })
    }

    /// The value of `key`, `None` when missing or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn err(&self, msg: &str) -> EngineError {
        EngineError::Load(format!("{}: {msg}", self.source))
    }

    fn bad(&self, key: &str, v: &Value, want: &str) -> EngineError {
        self.err(&format!("{key} = {v} is not {want}"))
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64, EngineError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, v, "a number")),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, EngineError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.bad(key, v, "a number")))
            .transpose()
    }

    pub fn i64(&self, key: &str, default: i64) -> Result<i64, EngineError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| self.bad(key, v, "an integer")),
        }
    }

    /// A positive integer (counts such as `num_train_timesteps`).
    pub fn count(&self, key: &str, default: usize) -> Result<usize, EngineError> {
        let v = self.i64(key, default as i64)?;
        if v < 1 {
            return Err(self.err(&format!("{key} = {v} must be at least 1")));
        }
        Ok(v as usize)
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, EngineError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, v, "a boolean")),
        }
    }

    /// A string option that must be one of `allowed`.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        allowed: &[&'static str],
    ) -> Result<&'static str, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let s = v.as_str().ok_or_else(|| self.bad(key, v, "a string"))?;
        allowed.iter().copied().find(|a| *a == s).ok_or_else(|| {
            self.err(&format!(
                "{key} = {s:?} is not supported (supported: {})",
                allowed
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// A boolean option this implementation supports only as `false`.
    pub fn must_be_false(&self, key: &str, class: &str) -> Result<(), EngineError> {
        if self.bool(key, false)? {
            return Err(self.err(&format!("{key} = true is not supported by this {class}")));
        }
        Ok(())
    }

    /// A list of numbers (`trained_betas`).
    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.bad(key, v, "a list of numbers"))?;
        list.iter()
            .map(|x| x.as_f64().ok_or_else(|| self.bad(key, v, "a list of numbers")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_missing_keys_take_the_default_and_wrong_types_name_the_key() {
        let v: Value = serde_json::from_str(r#"{"a": null, "b": "x", "c": 3}"#).unwrap();
        let r = Reader::new(&v, "s.json").unwrap();
        assert_eq!(r.f64("a", 1.5).unwrap(), 1.5);
        assert_eq!(r.f64("missing", 2.5).unwrap(), 2.5);
        assert_eq!(r.f64("c", 0.0).unwrap(), 3.0);
        let e = r.f64("b", 0.0).unwrap_err().to_string();
        assert!(e.contains("s.json") && e.contains("b = \"x\""), "{e}");
        let e = r.choice("b", "y", &["y", "z"]).unwrap_err().to_string();
        assert!(
            e.contains("b = \"x\" is not supported") && e.contains("\"z\""),
            "{e}"
        );
    }
}
