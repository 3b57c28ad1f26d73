//! The CLIP tokenizer on the real vocabulary (`../shared/clip-tokenizer`, skipped when absent)
//! and on the vocabulary compiled into the binary, against the ids of transformers' slow
//! `CLIPTokenizer` (OpenAI's BPE with ftfy), stored in `tests/fixtures/tokens.json` by
//! `scripts/make_fixtures.py`, and against each other.

mod common;

use common::*;
use zsad::clip::tokenizer::{ClipTokenizer, EOT};
use zsad::method::prompts::{
    sentences, ABNORMAL_STATES, ADACLIP_TEMPLATES, NORMAL_STATES, WINCLIP_TEMPLATES,
};

fn shared_tokenizer() -> Option<ClipTokenizer> {
    let p = shared()?.join("clip-tokenizer/tokenizer.json");
    if !p.exists() {
        return None;
    }
    Some(ClipTokenizer::from_file(&p).unwrap())
}

#[test]
fn ids_match_the_reference_tokenizer() {
    let Some(tok) = shared_tokenizer() else {
        skip(
            "tokenizer_parity::ids_match_the_reference_tokenizer",
            "../shared/clip-tokenizer is absent",
        );
        return;
    };
    check_reference_ids(&tok);
}

/// Needs no ../shared: the embedded vocabulary alone reproduces the reference ids.
#[test]
fn embedded_vocabulary_matches_the_reference_tokenizer() {
    check_reference_ids(&ClipTokenizer::embedded().unwrap());
}

/// Every prompt sentence the methods build, plus unicode, punctuation, odd whitespace and texts
/// past the context: the embedded vocabulary and ../shared's tokenizer.json give the same ids,
/// untruncated (`bpe`) and as 77-token sequences (`encode`).
#[test]
fn embedded_vocabulary_equals_the_shared_tokenizer() {
    let Some(file) = shared_tokenizer() else {
        skip(
            "tokenizer_parity::embedded_vocabulary_equals_the_shared_tokenizer",
            "../shared/clip-tokenizer is absent",
        );
        return;
    };
    let embedded = ClipTokenizer::embedded().unwrap();
    let mut texts: Vec<String> = Vec::new();
    for object in ["object", "metal_nut", "pcb 1", "toothbrush", "macaroni2"] {
        for states in [NORMAL_STATES, ABNORMAL_STATES] {
            for templates in [ADACLIP_TEMPLATES, WINCLIP_TEMPLATES] {
                texts.extend(sentences(states, templates, object));
            }
        }
    }
    for t in [
        "",
        " ",
        "object.",
        "damaged object.",
        "café naïve résumé Ærøskøbing",
        "東京 の 工場 で 検査",
        "Привет, мир! Ünïcödé ß ﬁ ligature",
        "emoji 🙂🔩⚙️ and flags 🇩🇪",
        "\u{200b}zero\u{200b}width\u{feff}",
        "tabs\tand\r\nnewlines\n\n  spaces",
        "!!!???...,,,;;;::: --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
        "it's they're we've I'm you'll he'd DON'T",
        "numbers 0123456789 3.14159 1e-7 0x1F",
        "<|startoftext|> inside <|endoftext|> text",
        "MiXeD CaSe WORDS",
        "hyphen-ated slash/separated back\\slash",
    ] {
        texts.push(t.to_string());
    }
    texts.push("a very long sentence about a scratched metal surface ".repeat(40));
    texts.push("x".repeat(5000));
    texts.push((0u32..2000).filter_map(char::from_u32).collect());
    assert!(texts.len() > 500);
    for t in &texts {
        assert_eq!(embedded.bpe(t).unwrap(), file.bpe(t).unwrap(), "bpe {t:?}");
        assert_eq!(
            embedded.encode(t).unwrap(),
            file.encode(t).unwrap(),
            "encode {t:?}"
        );
    }
}

fn check_reference_ids(tok: &ClipTokenizer) {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap())
            .unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text).unwrap();
        let end = got.iter().position(|&t| t == EOT).unwrap() + 1;
        assert_eq!(&got[..end], &want[..], "{text:?}");
        assert!(got[end..].iter().all(|&t| t == 0), "{text:?}: zero padding");
    }
}

#[test]
fn rejects_a_non_clip_tokenizer() {
    let dir = std::env::temp_dir().join(format!("zsad-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, "{not json").unwrap();
    let err = ClipTokenizer::from_file(&path).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
