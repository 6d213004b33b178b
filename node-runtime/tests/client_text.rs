//! Tokenizer, chat template and incremental decoding of the client library, on a
//! fixture's real tokenizer files.

mod common;

use unfed_node::client::TextCodec;
use unfed_node::client::text::IncrementalDecoder;
use unfed_node::proto::GetManifestResponse;

fn codec() -> (TextCodec, common::Reference) {
    let (_, dir, reference) = common::fixtures()
        .into_iter()
        .find(|f| f.0 == "qwen2-bf16")
        .unwrap();
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    let files = GetManifestResponse {
        tokenizer_json: read("tokenizer.json"),
        tokenizer_config_json: read("tokenizer_config.json"),
        chat_template: read("chat_template.jinja"),
        ..Default::default()
    };
    (
        TextCodec::from_manifest_files(&files, "qwen2-bf16").unwrap(),
        reference,
    )
}

#[test]
fn raw_prompts_tokenize_like_transformers_and_the_chat_template_wraps_others() {
    let (codec, reference) = codec();
    let text: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures_root().join("qwen2-bf16/reference.json"))
            .unwrap(),
    )
    .unwrap();
    let case = &text["cases"][0];
    let want: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    assert_eq!(
        codec
            .encode_prompt(case["text"].as_str().unwrap(), true)
            .unwrap(),
        want
    );
    assert_eq!(reference.cases[0].prompt_ids, want);

    assert!(codec.has_chat_template());
    let rendered = codec.render_prompt("Hi", false).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(
        codec.encode_prompt("Hi", false).unwrap().len()
            > codec.encode_prompt("Hi", true).unwrap().len()
    );
}

#[test]
fn incremental_decoding_reassembles_the_full_text() {
    let (codec, reference) = codec();
    let ids = &reference.cases[0].generated_ids;
    let mut dec = IncrementalDecoder::new(&codec);
    let streamed: String = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(streamed, codec.decode(ids).unwrap());
}
