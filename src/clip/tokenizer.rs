//! The CLIP BPE tokenizer from a Hugging Face `tokenizer.json`, producing OpenAI-style
//! 77-token sequences: `[SOT] + bpe + [EOT]`, truncated with EOT kept last, zero-padded.

use std::path::Path;

use crate::{Error, Result};

pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    context_length: usize,
}

impl ClipTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let tok = Self {
            inner,
            context_length: 77,
        };
        // Guard against a non-CLIP tokenizer.json: its special tokens must be CLIP's.
        if tok.inner.token_to_id("<|startoftext|>") != Some(SOT)
            || tok.inner.token_to_id("<|endoftext|>") != Some(EOT)
        {
            return Err(Error::Tokenizer(format!(
                "{}: not a CLIP tokenizer (<|startoftext|> must be {SOT} and <|endoftext|> {EOT})",
                path.display()
            )));
        }
        Ok(tok)
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
            .map_err(|e| Error::Tokenizer(format!("{text:?}: {e}")))?;
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
    fn long_text_keeps_eot_last() {
        let Some(t) = shared() else { return };
        let ids = t.encode(&"word ".repeat(200)).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], SOT);
        assert_eq!(ids[76], EOT);
    }
}
