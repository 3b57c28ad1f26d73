//! The CLIP BPE tokenizer from a Hugging Face `tokenizer.json`, producing OpenAI-style
//! 77-token sequences: `[SOT] + bpe + [EOT]`, truncated with EOT kept last, zero-padded.
//!
//! Every CLIP model shares one vocabulary, so a copy is compiled into the binary
//! ([`ClipTokenizer::embedded`]): models without a `tokenizer.json` beside them (random
//! weights, OpenAI/open_clip state dicts) need no `--tokenizer`.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    context_length: usize,
}

/// `tokenizer.json` of `openai/clip-vit-base-patch32` (OpenAI's `bpe_simple_vocab_16e6`
/// converted by Hugging Face), gzip-compressed: 0.6 MB instead of 3.9 MB. See `assets/README.md`.
const EMBEDDED_GZ: &[u8] = include_bytes!("../../assets/clip-tokenizer.json.gz");

/// The `tokenizer.json` compiled into the binary, inflated: byte for byte
/// `openai/clip-vit-base-patch32`'s (see `assets/README.md`).
pub fn embedded_json() -> Result<Vec<u8>> {
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(EMBEDDED_GZ)
        .read_to_end(&mut json)
        .map_err(|e| Error::tokenizer(format!("the embedded CLIP vocabulary: {e}")))?;
    Ok(json)
}

impl ClipTokenizer {
    /// Reads `tokenizer.json` through the guarded reader (a regular file of at most 64 MB: a
    /// FIFO, `/dev/zero` or a runaway file is refused before it is read).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::fsio::read(path, crate::fsio::FileKind::Tokenizer)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::tokenizer(format!("{}: {e}", path.display())))?;
        Self::checked(inner, &path.display().to_string())
    }

    /// The CLIP vocabulary compiled into the binary (what `--tokenizer` defaults to when no
    /// `tokenizer.json` lies beside the model).
    pub fn embedded() -> Result<Self> {
        let origin = "the embedded CLIP vocabulary";
        let json = embedded_json()?;
        let inner = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| Error::tokenizer(format!("{origin}: {e}")))?;
        Self::checked(inner, origin)
    }

    /// Guards against a non-CLIP tokenizer.json: its special tokens must be CLIP's.
    fn checked(inner: tokenizers::Tokenizer, origin: &str) -> Result<Self> {
        if inner.token_to_id("<|startoftext|>") != Some(SOT)
            || inner.token_to_id("<|endoftext|>") != Some(EOT)
        {
            return Err(Error::tokenizer(format!(
                "{origin}: not a CLIP tokenizer (<|startoftext|> must be {SOT} and <|endoftext|> {EOT})"
            )));
        }
        Ok(Self {
            inner,
            context_length: 77,
        })
    }

    pub fn with_context_length(mut self, n: usize) -> Self {
        self.context_length = n;
        self
    }

    /// BPE ids of `text` without SOT/EOT.
    pub fn bpe(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::tokenizer(format!("{text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[SOT] + bpe(text) + [EOT]`, cut to the context length with EOT kept as the last token
    /// (open_clip's `truncate=True`), then padded with 0.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let n = self.context_length;
        let mut ids = Vec::with_capacity(n);
        ids.push(SOT);
        ids.extend(self.bpe(text)?);
        ids.push(EOT);
        if ids.len() > n {
            ids.truncate(n);
            ids[n - 1] = EOT;
        }
        ids.resize(n, 0);
        Ok(ids)
    }

    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Option<ClipTokenizer> {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/clip-tokenizer/tokenizer.json");
        if !p.exists() {
            eprintln!("skipping: {} is absent", p.display());
            return None;
        }
        Some(ClipTokenizer::from_file(&p).unwrap())
    }

    #[test]
    fn a_photo_of_a_cat() {
        let Some(t) = shared() else { return };
        let ids = t.encode("a photo of a cat").unwrap();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&i| i == 0));
        assert_eq!(ids.len(), 77);
    }

    #[test]
    fn embedded_vocabulary_encodes_without_files() {
        let t = ClipTokenizer::embedded().unwrap();
        let ids = t.encode("a photo of a cat").unwrap();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    }

    #[test]
    fn long_text_keeps_eot_last() {
        let Some(t) = shared() else { return };
        let ids = t.encode(&"word ".repeat(200)).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], SOT);
        assert_eq!(ids[76], EOT);
    }
}
