//! The CLIP BPE tokenizers of SDXL (`tokenizer/` and `tokenizer_2/`), matching what diffusers
//! feeds its text encoders.
//!
//! diffusers tokenizes with transformers' `CLIPTokenizer`, whose pipeline (transformers 5) is:
//! NFC, every whitespace run replaced by one space, lower case; split on the CLIP word regex
//! (matches kept, the rest dropped), byte-level mapping, BPE with `</w>` on the last symbol of
//! each word. There is no `ftfy` or HTML unescaping. Special tokens come from
//! `tokenizer_config.json` / `special_tokens_map.json` and are matched in the raw text before
//! BPE, so a literal `<|endoftext|>` in a prompt becomes the end token, and with `tokenizer_2`'s
//! pad token `!` every `!` in a prompt becomes the pad id (0), as in diffusers.
//!
//! [`ClipTokenizer::encode`] gives exactly
//! `tok(text, padding="max_length", max_length=model_max_length, truncation=True).input_ids`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::loading::read_json;

/// Sequence length used when `tokenizer_config.json` has no `model_max_length`: the number of
/// positions of the CLIP text encoders SDXL ships with.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// The word regex of CLIP's pre-tokenizer; everything it does not match is dropped.
const CLIP_WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Suffix the BPE model appends to the last symbol of every word.
const END_OF_WORD_SUFFIX: &str = "</w>";

/// `CLIPTokenizer`'s default start token.
const DEFAULT_BOS: &str = "<|startoftext|>";

/// `CLIPTokenizer`'s default end, unknown and pad token.
const DEFAULT_EOS: &str = "<|endoftext|>";

/// A special token as `tokenizer_config.json` and `special_tokens_map.json` write it: a plain
/// string or an `AddedToken` dictionary.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Added(AddedTokenSpec),
}

/// An `AddedToken` dictionary; absent flags take transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
struct AddedTokenSpec {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: Option<bool>,
    #[serde(default)]
    special: Option<bool>,
}

impl AddedTokenSpec {
    fn to_added_token(&self, special: bool) -> AddedToken {
        AddedToken::from(self.content.clone(), special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized.unwrap_or(!special))
    }
}

impl TokenSpec {
    /// The token as a special added token (named tokens are always special in transformers).
    fn to_special_token(&self) -> AddedToken {
        match self {
            TokenSpec::Plain(content) => AddedToken::from(content.clone(), true),
            TokenSpec::Added(spec) => spec.to_added_token(true),
        }
    }
}

/// The fields of `tokenizer_config.json` that shape tokenization. Unknown keys are ignored.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    model_max_length: Option<serde_json::Number>,
    /// Token id (as a string) to added token, written by transformers >= 4.34.
    #[serde(default)]
    added_tokens_decoder: Option<HashMap<String, AddedTokenSpec>>,
}

/// `special_tokens_map.json`. Unknown keys are ignored.
#[derive(Debug, Default, Deserialize)]
struct SpecialTokensMap {
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
}

/// Special tokens and length limit resolved from a tokenizer folder's config files.
struct Settings {
    /// `added_tokens_decoder` entries in id order.
    declared: Vec<(u32, AddedToken)>,
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
    max_length: usize,
    /// Where the settings came from, for error messages.
    source: String,
}

impl Settings {
    /// Reads `tokenizer_config.json` and `special_tokens_map.json` from `config_dir` (both
    /// optional), resolving them as transformers 5 does: without `added_tokens_decoder`, the
    /// special tokens map overrides the config; absent tokens take `CLIPTokenizer`'s defaults.
    fn read(config_dir: Option<&Path>) -> Result<Self> {
        let (config, map, source) = match config_dir {
            None => (
                TokenizerConfig::default(),
                SpecialTokensMap::default(),
                "CLIPTokenizer defaults".to_owned(),
            ),
            Some(dir) => {
                require_dir(dir)?;
                let config_path = dir.join("tokenizer_config.json");
                let config: TokenizerConfig =
                    read_optional_json(&config_path, "CLIP tokenizer config")?.unwrap_or_default();
                let map = if config.added_tokens_decoder.is_none() {
                    read_optional_json(
                        &dir.join("special_tokens_map.json"),
                        "CLIP special tokens map",
                    )?
                    .unwrap_or_default()
                } else {
                    SpecialTokensMap::default()
                };
                (config, map, config_path.display().to_string())
            }
        };
        Self::resolve(config, map, source)
    }

    /// Resolves parsed config files (see [`Settings::read`]); `source` names them in errors.
    fn resolve(config: TokenizerConfig, map: SpecialTokensMap, source: String) -> Result<Self> {
        let role =
            |from_map: &Option<TokenSpec>, from_config: &Option<TokenSpec>, default: &str| {
                from_map.as_ref().or(from_config.as_ref()).map_or_else(
                    || AddedToken::from(default, true),
                    TokenSpec::to_special_token,
                )
            };
        Ok(Self {
            declared: declared_tokens(&config, &source)?,
            bos: role(&map.bos_token, &config.bos_token, DEFAULT_BOS),
            eos: role(&map.eos_token, &config.eos_token, DEFAULT_EOS),
            unk: role(&map.unk_token, &config.unk_token, DEFAULT_EOS),
            pad: role(&map.pad_token, &config.pad_token, DEFAULT_EOS),
            max_length: max_length(config.model_max_length.as_ref(), &source)?,
            source,
        })
    }
}

/// `added_tokens_decoder` as `(id, token)` pairs sorted by id.
fn declared_tokens(config: &TokenizerConfig, source: &str) -> Result<Vec<(u32, AddedToken)>> {
    let Some(decoder) = &config.added_tokens_decoder else {
        return Ok(Vec::new());
    };
    let mut declared = decoder
        .iter()
        .map(|(key, spec)| {
            let id = key.parse::<u32>().map_err(|_| {
                Error::Tokenizer(format!(
                    "{source}: added_tokens_decoder key {key:?} is not a token id"
                ))
            })?;
            Ok((id, spec.to_added_token(spec.special.unwrap_or(false))))
        })
        .collect::<Result<Vec<_>>>()?;
    declared.sort_by_key(|(id, _)| *id);
    Ok(declared)
}

/// `model_max_length`, which must leave room for the start and end tokens.
fn max_length(value: Option<&serde_json::Number>, source: &str) -> Result<usize> {
    let Some(number) = value else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    number
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n >= 2)
        .ok_or_else(|| {
            Error::unsupported(format!(
                "model_max_length {number} in {source}: expected an integer of at least 2 \
                 (room for the start and end tokens)"
            ))
        })
}

/// Fails with [`Error::NotFound`] unless `dir` is a folder.
fn require_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::NotFound {
            path: dir.to_path_buf(),
            what: "CLIP tokenizer folder".into(),
        })
    }
}

/// Parses `path` when it exists.
fn read_optional_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    if path.exists() {
        read_json(path, what).map(Some)
    } else {
        Ok(None)
    }
}

/// Reads `merges.txt` as the tokenizers library does: `#version` lines are skipped, every other
/// line is two symbols separated by one space, in rank order.
fn read_merges(path: &Path) -> Result<Merges> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            what: "CLIP BPE merges (merges.txt)".into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_merges(&text, &path.display().to_string())
}

/// Parses the text of a `merges.txt`; `source` names it in errors.
fn parse_merges(text: &str, source: &str) -> Result<Merges> {
    text.lines()
        .filter(|line| !line.starts_with("#version"))
        .enumerate()
        .map(|(rank, line)| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(first), Some(second), None) => Ok((first.to_owned(), second.to_owned())),
                _ => Err(Error::Tokenizer(format!(
                    "{source}: merge {} ({line:?}) is not two symbols separated by one space",
                    rank + 1
                ))),
            }
        })
        .collect()
}

/// Builds transformers' `CLIPTokenizer` pipeline from `vocab.json` and `merges.txt` in `dir`.
fn clip_bpe_tokenizer(dir: &Path, unk: &str) -> Result<Tokenizer> {
    let vocab: HashMap<String, u32> =
        read_json(&dir.join("vocab.json"), "CLIP vocabulary (vocab.json)")?;
    let merges = read_merges(&dir.join("merges.txt"))?;
    build_clip_bpe(vocab, merges, unk, &dir.display().to_string())
}

/// The CLIP pipeline around a BPE model; `source` names the files in errors.
fn build_clip_bpe(
    vocab: HashMap<String, u32>,
    merges: Merges,
    unk: &str,
    source: &str,
) -> Result<Tokenizer> {
    let library = |what: &str| {
        let context = format!("{what} for {source}");
        move |e: tokenizers::Error| Error::Tokenizer(format!("{context}: {e}"))
    };
    let model = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD_SUFFIX.to_owned())
        .fuse_unk(false)
        .unk_token(unk.to_owned())
        .build()
        .map_err(library("BPE model"))?;
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
        .map_err(library("whitespace normalizer"))?;
    let normalizer = NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()]);
    let words = Split::new(
        SplitPattern::Regex(CLIP_WORD_PATTERN.to_owned()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(library("CLIP word splitter"))?;
    // transformers' `ByteLevel(add_prefix_space=False)`: trimmed offsets and the GPT-2 regex,
    // which splits nothing further after the CLIP split.
    let pre_tokenizer =
        PreTokenizerSequence::new(vec![words.into(), ByteLevel::new(false, true, true).into()]);
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(pre_tokenizer));
    Ok(tokenizer)
}

/// A CLIP BPE tokenizer producing the token ids SDXL's text encoders take.
///
/// ```no_run
/// use sdxl_core::text::tokenizer::ClipTokenizer;
///
/// let tok = ClipTokenizer::from_dir("sdxl-base/tokenizer_2".as_ref())?;
/// let ids = tok.encode("a photo of an astronaut riding a horse on mars")?;
/// assert_eq!(ids.len(), tok.max_length());
/// # Ok::<(), sdxl_core::Error>(())
/// ```
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` or `tokenizer_2/` folder.
    ///
    /// With a `tokenizer.json` the folder is loaded as [`ClipTokenizer::from_files`] does.
    /// Otherwise the CLIP pipeline is built from `vocab.json` and `merges.txt` (the layout of
    /// the SDXL checkpoints). Special tokens and the sequence length come from
    /// `tokenizer_config.json` and `special_tokens_map.json` when present.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `dir` or a required file is missing, [`Error::Io`] when a file
    /// cannot be read, [`Error::Json`] for malformed JSON, [`Error::Unsupported`] for a
    /// `model_max_length` below 2, and [`Error::Tokenizer`] when the tokenizers library rejects
    /// the vocabulary, merges or tokens.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        require_dir(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.exists() {
            return Self::from_files(&tokenizer_json, Some(dir));
        }
        let settings = Settings::read(Some(dir))?;
        let tokenizer = clip_bpe_tokenizer(dir, &settings.unk.content)?;
        Self::with_settings(tokenizer, settings)
    }

    /// Loads a standalone `tokenizer.json` (a serialized tokenizers pipeline, used as stored),
    /// taking special tokens and the sequence length from `tokenizer_config.json` and
    /// `special_tokens_map.json` in `config_dir`.
    ///
    /// Without `config_dir`, `CLIPTokenizer`'s defaults apply: start token `<|startoftext|>`,
    /// end, unknown and pad token `<|endoftext|>`, length [`DEFAULT_MAX_LENGTH`]. The file's
    /// padding, truncation and post-processor are ignored; [`ClipTokenizer::encode`] adds the
    /// start, end and pad tokens itself.
    ///
    /// # Errors
    /// As [`ClipTokenizer::from_dir`].
    pub fn from_files(tokenizer_json: &Path, config_dir: Option<&Path>) -> Result<Self> {
        let tokenizer: Tokenizer = read_json(tokenizer_json, "CLIP tokenizer.json")?;
        let settings = Settings::read(config_dir)?;
        Self::with_settings(tokenizer, settings)
    }

    /// Builds the CLIP pipeline from the contents of `vocab.json`, `merges.txt` and
    /// `tokenizer_config.json`, for tokenizers shipped inside a program (the defaults that
    /// single-file checkpoints need, see [`crate::loading::single_file`]). `origin` names the
    /// files in errors, e.g. `<sdxl-core assets>/tokenizer_2`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] for malformed contents or tokens the vocabulary lacks,
    /// [`Error::Unsupported`] for a `model_max_length` below 2.
    pub fn from_strings(
        vocab_json: &str,
        merges_txt: &str,
        tokenizer_config_json: &str,
        origin: &str,
    ) -> Result<Self> {
        let parse_error =
            |file: &str, e: serde_json::Error| Error::Tokenizer(format!("{origin}/{file}: {e}"));
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|e| parse_error("vocab.json", e))?;
        let config: TokenizerConfig = serde_json::from_str(tokenizer_config_json)
            .map_err(|e| parse_error("tokenizer_config.json", e))?;
        let merges = parse_merges(merges_txt, &format!("{origin}/merges.txt"))?;
        let settings = Settings::resolve(
            config,
            SpecialTokensMap::default(),
            format!("{origin}/tokenizer_config.json"),
        )?;
        let tokenizer = build_clip_bpe(vocab, merges, &settings.unk.content, origin)?;
        Self::with_settings(tokenizer, settings)
    }

    /// Registers the configured tokens, as transformers does after building the backend: the
    /// declared added tokens in id order, then start, end, unknown and pad as special tokens.
    fn with_settings(mut tokenizer: Tokenizer, settings: Settings) -> Result<Self> {
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("disabling truncation: {e}")))?;
        tokenizer.with_padding(None);
        for (id, token) in &settings.declared {
            tokenizer.add_tokens(std::slice::from_ref(token));
            let got = tokenizer.token_to_id(&token.content);
            if got != Some(*id) {
                return Err(Error::Tokenizer(format!(
                    "{}: added token {:?} is declared with id {id} but the vocabulary gives {got:?}",
                    settings.source, token.content
                )));
            }
        }
        for token in [&settings.bos, &settings.eos, &settings.unk, &settings.pad] {
            tokenizer.add_special_tokens(std::slice::from_ref(token));
        }
        let id_of = |token: &AddedToken, role: &str| {
            tokenizer.token_to_id(&token.content).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: the {role} token {:?} has no id",
                    settings.source, token.content
                ))
            })
        };
        Ok(Self {
            bos_id: id_of(&settings.bos, "start")?,
            eos_id: id_of(&settings.eos, "end")?,
            pad_id: id_of(&settings.pad, "pad")?,
            max_length: settings.max_length,
            tokenizer,
        })
    }

    /// The content tokens of `text`, without start and end tokens and without truncation.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when the tokenizers library fails to encode.
    pub fn tokenize_content(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[start] + content[..max_length - 2] + [end]`, padded with the pad id to
    /// [`ClipTokenizer::max_length`]: transformers'
    /// `tok(text, padding="max_length", max_length=max_length, truncation=True).input_ids`.
    ///
    /// # Errors
    /// As [`ClipTokenizer::tokenize_content`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let content = self.tokenize_content(text)?;
        let kept = content.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(content.iter().take(kept));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// `[start] + content + [end]` with every content token kept and no padding:
    /// transformers' `tok(text, padding="longest").input_ids` for one prompt. Longer than
    /// [`ClipTokenizer::max_length`] exactly when [`ClipTokenizer::encode`] truncates.
    ///
    /// # Errors
    /// As [`ClipTokenizer::tokenize_content`].
    pub fn encode_untruncated(&self, text: &str) -> Result<Vec<u32>> {
        let content = self.tokenize_content(text)?;
        let mut ids = Vec::with_capacity(content.len() + 2);
        ids.push(self.bos_id);
        ids.extend(content);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Id of the start token (`<|startoftext|>`, 49406 in SDXL).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end token (`<|endoftext|>`, 49407 in SDXL).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token: 49407 (`<|endoftext|>`) for SDXL's `tokenizer`, 0 (`!`) for
    /// `tokenizer_2`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Length of [`ClipTokenizer::encode`]'s output (`model_max_length`, 77 in SDXL).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const VOCAB: &str = r#"{"!": 0, "a": 1, "b": 2, "a</w>": 3, "b</w>": 4, "ab</w>": 5, "<|startoftext|>": 6, "<|endoftext|>": 7, "!</w>": 8}"#;
    const MERGES: &str = "#version: 0.2\na b</w>\n";

    /// A temporary folder, removed when dropped (the tests leave nothing behind).
    struct TempFolder(PathBuf);

    impl std::ops::Deref for TempFolder {
        type Target = std::path::Path;

        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl AsRef<std::path::Path> for TempFolder {
        fn as_ref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempFolder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fresh folder holding `files` (name, content).
    fn folder(name: &str, files: &[(&str, &str)]) -> TempFolder {
        let dir =
            std::env::temp_dir().join(format!("sdxl-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, content) in files {
            std::fs::write(dir.join(file), content).unwrap();
        }
        TempFolder(dir)
    }

    fn tiny(name: &str, config: &str) -> ClipTokenizer {
        let dir = folder(
            name,
            &[
                ("vocab.json", VOCAB),
                ("merges.txt", MERGES),
                ("tokenizer_config.json", config),
            ],
        );
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn encodes_truncates_and_pads_to_model_max_length() {
        let tok = tiny("pad", r#"{"model_max_length": 5}"#);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
            (6, 7, 7, 5)
        );
        assert_eq!(tok.tokenize_content("AB\t a").unwrap(), [5, 3]);
        assert_eq!(tok.encode("ab").unwrap(), [6, 5, 7, 7, 7]);
        assert_eq!(tok.encode("ab a b a").unwrap(), [6, 5, 3, 4, 7]);
        assert_eq!(
            tok.encode_untruncated("ab a b a").unwrap(),
            [6, 5, 3, 4, 3, 7]
        );
        assert_eq!(tok.encode("").unwrap(), [6, 7, 7, 7, 7]);
        assert_eq!(tok.encode("a <|endoftext|> b").unwrap(), [6, 3, 7, 4, 7]);
    }

    #[test]
    fn pad_token_bang_is_split_out_as_special() {
        let tok = tiny("bang", r#"{"pad_token": "!"}"#);
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(tok.max_length(), DEFAULT_MAX_LENGTH);
        assert_eq!(tok.tokenize_content("ab!!").unwrap(), [5, 0, 0]);
        let plain = tiny("nobang", "{}");
        assert_eq!(plain.tokenize_content("ab!").unwrap(), [5, 8]);
    }

    #[test]
    fn special_tokens_map_overrides_config_without_added_tokens_decoder() {
        let dir = folder(
            "map",
            &[
                ("vocab.json", VOCAB),
                ("merges.txt", MERGES),
                ("tokenizer_config.json", r#"{"pad_token": "<|endoftext|>"}"#),
                (
                    "special_tokens_map.json",
                    r#"{"pad_token": {"content": "!"}}"#,
                ),
            ],
        );
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_id(), 0);
        let decoder = r#"{"pad_token": "<|endoftext|>", "added_tokens_decoder": {
            "7": {"content": "<|endoftext|>", "special": true},
            "6": {"content": "<|startoftext|>", "special": true}}}"#;
        std::fs::write(dir.join("tokenizer_config.json"), decoder).unwrap();
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_id(), 7);
    }

    #[test]
    fn added_token_with_wrong_id_is_rejected() {
        let dir = folder(
            "decl",
            &[
                ("vocab.json", VOCAB),
                ("merges.txt", MERGES),
                (
                    "tokenizer_config.json",
                    r#"{"added_tokens_decoder": {"3": {"content": "<|endoftext|>"}}}"#,
                ),
            ],
        );
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(
            matches!(err, Error::Tokenizer(ref m) if m.contains("id 3")),
            "{err}"
        );
    }

    #[test]
    fn missing_folder_and_files_are_not_found() {
        let missing = std::env::temp_dir().join("sdxl-tokenizer-does-not-exist");
        let err = ClipTokenizer::from_dir(&missing).unwrap_err();
        assert!(
            matches!(err, Error::NotFound { ref path, .. } if *path == missing),
            "{err}"
        );

        let dir = folder("novocab", &[("merges.txt", MERGES)]);
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::NotFound { ref path, .. } if path.ends_with("vocab.json")));

        let dir = folder("nomerges", &[("vocab.json", VOCAB)]);
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::NotFound { ref path, .. } if path.ends_with("merges.txt")));

        let err = ClipTokenizer::from_files(&dir.join("tokenizer.json"), None).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }

    #[test]
    fn malformed_files_are_typed_errors() {
        let dir = folder(
            "badvocab",
            &[("vocab.json", "{\"a\": "), ("merges.txt", MERGES)],
        );
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");

        let dir = folder(
            "badmerges",
            &[("vocab.json", VOCAB), ("merges.txt", "a b c\n")],
        );
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{err}");

        let dir = folder("badjson", &[("tokenizer.json", "{\"model\": 1}")]);
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");

        let dir = folder(
            "badlen",
            &[
                ("vocab.json", VOCAB),
                ("merges.txt", MERGES),
                ("tokenizer_config.json", r#"{"model_max_length": 1e30}"#),
            ],
        );
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
    }

    #[test]
    fn tokenizer_json_round_trip_matches_vocab_and_merges() {
        let built = tiny("json-src", r#"{"pad_token": "!"}"#);
        let json = built.tokenizer.to_string(false).unwrap();
        let dir = folder("json", &[("tokenizer.json", &json)]);
        let loaded = ClipTokenizer::from_files(&dir.join("tokenizer.json"), None).unwrap();
        assert_eq!(loaded.pad_id(), 7);
        for text in ["ab a b", "AB!  a", "a <|endoftext|>"] {
            assert_eq!(
                loaded.tokenize_content(text).unwrap(),
                built.tokenize_content(text).unwrap()
            );
        }
    }
}
