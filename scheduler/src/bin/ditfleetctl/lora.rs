//! `ditfleetctl lora`: push, list and remove adapters in the LoRA registry.

use super::*;

/// The registry named by `--registry`, else `DITFLEET_LORA_REGISTRY`.
pub(crate) fn open_registry(flag: Option<String>) -> Result<ditfleet_common::lora::Registry> {
    let url = match flag.or_else(|| Env::process().raw("DITFLEET_LORA_REGISTRY")) {
        Some(u) => u,
        None => bail!(
            "no LoRA registry: set DITFLEET_LORA_REGISTRY (s3://bucket[/prefix] or file:///dir) or pass --registry"
        ),
    };
    ditfleet_common::lora::Registry::open(&url).map_err(|e| anyhow::anyhow!("{e}"))
}

pub(crate) async fn lora(cmd: LoraCmd) -> Result<i32> {
    match cmd {
        LoraCmd::Push {
            file,
            name,
            version,
            base_model,
            registry,
        } => {
            let reg = open_registry(registry)?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            let bar = if std::io::stderr().is_terminal() {
                let b = ProgressBar::new(len);
                b.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b.set_message(format!("pushing {name}@{version}"));
                Some(b)
            } else {
                None
            };
            let b2 = bar.clone();
            let m = reg
                .push(&file, &name, &version, &base_model, &mut move |done, _| {
                    if let Some(b) = &b2 {
                        b.set_position(done);
                    }
                })
                .await
                .map_err(|e| anyhow::anyhow!("lora push {name}@{version}: {e}"))?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            out!(
                "pushed {} for {} ({} format, {} bytes, sha256 {}) to {}",
                m.label(),
                m.base_model,
                m.format,
                m.bytes,
                m.sha256,
                reg.describe()
            );
            Ok(0)
        }
        LoraCmd::List {
            base_model,
            json,
            registry,
        } => {
            let reg = open_registry(registry)?;
            let list: Vec<_> = reg
                .list()
                .await
                .map_err(|e| anyhow::anyhow!("lora list: {e}"))?
                .into_iter()
                .filter(|m| base_model.as_ref().is_none_or(|b| &m.base_model == b))
                .collect();
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            if list.is_empty() {
                out!("no adapters in {}", reg.describe());
                return Ok(0);
            }
            out!(
                "{:<40} {:<12} {:<6} {:>12} {:<16} {:<20}",
                "ADAPTER",
                "BASE MODEL",
                "FORMAT",
                "BYTES",
                "SHA256",
                "CREATED"
            );
            for m in list {
                out!(
                    "{:<40} {:<12} {:<6} {:>12} {:<16} {:<20}",
                    m.label(),
                    m.base_model,
                    m.format,
                    m.bytes,
                    m.sha256.get(..16).unwrap_or(&m.sha256),
                    m.created
                );
            }
            Ok(0)
        }
        LoraCmd::Rm { adapter, registry } => {
            let (name, version) = adapter
                .split_once('@')
                .ok_or_else(|| anyhow::anyhow!("lora rm: {adapter:?} is not NAME@VERSION"))?;
            let reg = open_registry(registry)?;
            if reg
                .remove(name, version)
                .await
                .map_err(|e| anyhow::anyhow!("lora rm {adapter}: {e}"))?
            {
                out!("removed {adapter} from {}", reg.describe());
                Ok(0)
            } else {
                eprintln!("ditfleetctl: {adapter} is not in {}", reg.describe());
                Ok(1)
            }
        }
    }
}
