//! The CLIP tokenizer on the real vocabulary (`../shared/clip-tokenizer`, skipped when absent)
//! against the ids of transformers' slow `CLIPTokenizer` (OpenAI's BPE with ftfy), stored in
//! `tests/fixtures/tokens.json` by `scripts/make_fixtures.py`.

mod common;

use common::*;
use zsad::clip::tokenizer::{ClipTokenizer, EOT};

#[test]
fn ids_match_the_reference_tokenizer() {
    let Some(shared) = shared() else {
        eprintln!("skipping: ../shared is absent");
        return;
    };
    let tok = ClipTokenizer::from_file(&shared.join("clip-tokenizer/tokenizer.json")).unwrap();
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
