//! Resolving `--model`: a local folder or file, a Hugging Face hub id (cache first, then a
//! download when online), or `random:<architecture>`.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// Files on disk: optional `config.json`, one or more weight files, optional `tokenizer.json`.
    Files {
        config: Option<PathBuf>,
        weights: Vec<PathBuf>,
        tokenizer: Option<PathBuf>,
    },
    /// Deterministic random weights of a named architecture (`random:ViT-L-14-336`).
    Random { arch: String, seed: u64 },
}

/// Weight file names accepted in a model folder, in order of preference.
const WEIGHT_NAMES: &[&str] = &[
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
];

/// Resolves a `--model` argument. See the `--model` help for the accepted forms.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    if let Some(rest) = spec.strip_prefix("random:") {
        let (arch, seed) = match rest.split_once(':') {
            Some((a, s)) => (
                a,
                s.parse()
                    .map_err(|_| Error::model(format!("bad seed in `{spec}`")))?,
            ),
            None => (rest, 0),
        };
        if super::config::ClipConfig::by_name(arch).is_none() {
            return Err(Error::model(format!(
                "unknown architecture `{arch}` in `{spec}`; known: {}",
                super::config::ClipConfig::NAMES.join(", ")
            )));
        }
        return Ok(ModelSource::Random {
            arch: arch.to_string(),
            seed,
        });
    }
    let path = Path::new(spec);
    if path.exists() {
        return from_path(path);
    }
    if is_local_path(spec) {
        return Err(Error::model(format!(
            "no such model folder or file: {spec} (a path, not a Hugging Face id: check the spelling, \
             or download the model into it with `hf download ORG/NAME config.json model.safetensors \
             tokenizer.json --local-dir {spec}`)"
        )));
    }
    if looks_like_hub_id(spec) {
        return from_hub(spec);
    }
    Err(Error::model(format!(
        "model `{spec}` is neither an existing path, a Hugging Face id (org/name) nor random:<arch>"
    )))
}

/// Whether a `--model` that does not exist can only have meant a local path: hub ids are
/// `org/name`, so `./models/clip-b16`, `/data/m`, `~/m`, `a/b/c` or `models/typo` (when
/// `models/` exists) are mistyped paths, and looking them up on the hub would only hide the typo
/// behind a download error.
fn is_local_path(spec: &str) -> bool {
    spec.starts_with(['.', '/', '~', '\\'])
        || spec.matches('/').count() > 1
        || spec.contains('\\')
        || Path::new(spec)
            .parent()
            .is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir())
}

fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty())
        && !spec.starts_with('.')
}

/// `dir/name` when it exists; an error when something that is not a regular file (a FIFO, a
/// folder, a broken link) holds the name, which a model folder must not silently ignore.
fn existing(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let p = dir.join(name);
    match std::fs::symlink_metadata(&p) {
        Err(_) => Ok(None),
        Ok(_) => {
            crate::fsio::check_regular(&p, crate::fsio::FileKind::ModelConfig)
                .or_else(|e| match name {
                    // Weight files are bounded by their own kind, not a config's.
                    n if n.ends_with(".safetensors") || n.ends_with(".bin") => {
                        crate::fsio::check_regular(&p, crate::fsio::FileKind::Weights)
                    }
                    _ => Err(e),
                })
                .map_err(|e| Error::model(format!("{e} (in the model folder)")))?;
            Ok(Some(p))
        }
    }
}

fn from_path(path: &Path) -> Result<ModelSource> {
    if crate::fsio::is_file(path) {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok(ModelSource::Files {
            config: existing(dir, "config.json")?,
            weights: vec![path.to_path_buf()],
            tokenizer: existing(dir, "tokenizer.json")?,
        });
    }
    let mut weights = None;
    for n in WEIGHT_NAMES {
        if let Some(w) = existing(path, n)? {
            weights = Some(vec![w]);
            break;
        }
    }
    let weights = if let Some(w) = weights {
        w
    } else if let Some(index) = existing(path, "model.safetensors.index.json")? {
        shards_from_index(&index)?
    } else {
        let mut found: Vec<PathBuf> = crate::fsio::list_dir(path)
            .map_err(|e| Error::io(path, e))?
            .into_iter()
            .map(|n| path.join(n))
            .filter(|p| crate::fsio::is_file(p) && super::weights::is_weight_file(p))
            .collect();
        found.sort();
        if found.len() != 1 {
            return Err(Error::model(format!(
                "{}: expected one of {} (or a single .safetensors/.bin/.pth file), found {}",
                path.display(),
                WEIGHT_NAMES.join(", "),
                if found.is_empty() {
                    "none".to_string()
                } else {
                    format!("{} candidates", found.len())
                }
            )));
        }
        found
    };
    Ok(ModelSource::Files {
        config: existing(path, "config.json")?,
        weights,
        tokenizer: existing(path, "tokenizer.json")?,
    })
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::fsio::read_text(index, crate::fsio::FileKind::ModelConfig)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(format!("{}: {e}", index.display())))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| Error::model(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The hub cache in use: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
/// (hf-hub 0.5 ignores `HF_HUB_CACHE`, so it is honoured here).
pub fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => hf_hub::Cache::new(PathBuf::from(p)),
        _ => hf_hub::Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Resolves a hub id from the local cache, downloading what is missing unless `HF_HUB_OFFLINE`
/// is set. The error for a missing model says which files to put where.
fn from_hub(id: &str) -> Result<ModelSource> {
    let cache = hub_cache();
    let cached = cache.model(id.to_string());
    let config = cached.get("config.json");
    let weights = WEIGHT_NAMES.iter().find_map(|n| cached.get(n));
    let tokenizer = cached.get("tokenizer.json");
    if let (Some(config), Some(weights)) = (&config, &weights) {
        return Ok(ModelSource::Files {
            config: Some(config.clone()),
            weights: vec![weights.clone()],
            tokenizer,
        });
    }
    let missing = || {
        let mut m = Vec::new();
        if config.is_none() {
            m.push("config.json");
        }
        if weights.is_none() {
            m.push("model.safetensors");
        }
        m.join(" and ")
    };
    let hint = |why: &str| {
        Error::model(format!(
            "model `{id}` is not in the Hugging Face cache ({}) and {why}: {} missing. Where the \
             hub is reachable, run `hf download {id} config.json model.safetensors tokenizer.json \
             --local-dir DIR` (or fetch them from https://huggingface.co/{id}), then pass `--model DIR`",
            cache.path().display(),
            missing()
        ))
    };
    if offline() {
        return Err(hint("HF_HUB_OFFLINE is set"));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| hint(&format!("the hub client failed ({e})")))?;
    let repo = api.model(id.to_string());
    let config = repo
        .get("config.json")
        .map_err(|e| hint(&format!("the download failed ({e})")))?;
    let weights = ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .find_map(|n| repo.get(n).ok())
        .ok_or_else(|| hint("the download of model.safetensors failed"))?;
    let tokenizer = repo.get("tokenizer.json").ok();
    Ok(ModelSource::Files {
        config: Some(config),
        weights: vec![weights],
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_specs() {
        assert_eq!(
            resolve("random:ViT-L-14-336").unwrap(),
            ModelSource::Random {
                arch: "ViT-L-14-336".into(),
                seed: 0
            }
        );
        assert_eq!(
            resolve("random:tiny:5").unwrap(),
            ModelSource::Random {
                arch: "tiny".into(),
                seed: 5
            }
        );
        assert!(resolve("random:resnet")
            .unwrap_err()
            .to_string()
            .contains("known:"));
    }

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("openai/clip-vit-base-patch16"));
        assert!(!looks_like_hub_id("./a/b"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("single"));
    }

    #[test]
    fn mistyped_local_paths_are_not_hub_ids() {
        // `src/` exists (tests run in the crate root), so `src/typo` can only be a path.
        for spec in [
            "./models/clip-vit-b16",
            "../models/x",
            "/no/such/model",
            "~/models/clip",
            "models/clip/vit-b16",
            "src/typo",
        ] {
            let e = resolve(spec).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("no such model folder or file: {spec} ")),
                "{spec}: {e}"
            );
        }
        assert!(!is_local_path("openai/clip-vit-base-patch16"));
        assert!(!is_local_path("single"));
    }

    #[test]
    fn unknown_spec() {
        assert!(resolve("definitely-not-here")
            .unwrap_err()
            .to_string()
            .contains("neither"));
    }
}
