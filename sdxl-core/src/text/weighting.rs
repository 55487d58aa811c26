//! Prompt weighting syntax and long prompts: from a prompt as users type it to the token
//! windows each CLIP encoder reads, with a weight per token.
//!
//! The syntax is the one of AUTOMATIC1111's web UI (which ComfyUI and Compel's
//! A1111-compatible mode share):
//!
//! | text | meaning |
//! |---|---|
//! | `(word)` | weight × 1.1 |
//! | `(word:1.3)` | weight × 1.3 (any decimal number, optionally signed, spaces allowed around it) |
//! | `[word]` | weight ÷ 1.1 |
//! | `((word))`, `[(word:1.5)]` | nested brackets multiply |
//! | `\(` `\)` `\[` `\]` `\\` | the literal character |
//! | `BREAK` (upper case, a whole word) | end the current 75-token window here |
//!
//! A closing bracket without its opening bracket, and an opening bracket that is never closed,
//! are literal text (A1111 instead weights an unclosed opening bracket's text up to the end of
//! the prompt). Round and square brackets nest independently, as in A1111. A `:` that does not
//! start a `:number)` weight, and a backslash before any other character, are literal text.
//! Neighbouring pieces of equal weight are merged before tokenizing, as A1111 does, so
//! `(a)(b)` is the single word `ab` at weight 1.1.
//!
//! [`parse`] turns a prompt into [`Piece`]s; [`prompt_chunks`] tokenizes each piece on its own,
//! attaches its weight to each of its tokens and lays the tokens out in windows of
//! `max_length` ids (`[start] + up to max_length - 2 tokens + [end]`, then the tokenizer's pad
//! id), as [`LongPrompts`] says.

use crate::error::{Error, Result};
use crate::text::tokenizer::ClipTokenizer;

/// Weight factor of one pair of round brackets (and the divisor of square brackets).
pub const BRACKET_FACTOR: f64 = 1.1;

/// How many tokens back from the end of a full window a comma may be for the text after it to
/// move to the next window (A1111's default `comma_padding_backtrack`).
pub const COMMA_BACKTRACK: usize = 20;

/// The keyword that ends a window.
const BREAK_KEYWORD: &str = "BREAK";

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text whose tokens all get `weight`.
    Text {
        /// The literal text, with the syntax removed.
        text: String,
        /// The product of the enclosing brackets' factors (1.0 outside brackets).
        weight: f64,
    },
    /// A `BREAK`: the current window ends here.
    Break,
}

/// What to do with prompts longer than one encoder window (`max_length - 2` content tokens,
/// 75 for SDXL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongPrompts {
    /// Split the tokens into windows, each encoded on its own; the embeddings are concatenated
    /// along the sequence axis. A window ends at `BREAK`, or when it is full; when it is full
    /// and a comma lies within the last [`COMMA_BACKTRACK`] tokens, the text after that comma
    /// moves to the next window (as A1111 does).
    #[default]
    Chunk,
    /// Keep the first `max_length - 2` tokens and drop the rest, ignoring `BREAK`: diffusers'
    /// behaviour, one window.
    Truncate,
}

/// One encoder window: `max_length` token ids and their weights (1.0 for the start, end and
/// pad tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    /// `[start] + content + [end]`, padded with the tokenizer's pad id.
    pub ids: Vec<u32>,
    /// One weight per id.
    pub weights: Vec<f32>,
}

impl TokenChunk {
    /// The window holding `content` (`(token, weight)` pairs, at most `max_length - 2`).
    fn new(tokenizer: &ClipTokenizer, content: &[(u32, f32)]) -> Self {
        let len = tokenizer.max_length();
        let mut ids = Vec::with_capacity(len);
        let mut weights = Vec::with_capacity(len);
        ids.push(tokenizer.bos_id());
        weights.push(1.0);
        for &(id, w) in content {
            ids.push(id);
            weights.push(w);
        }
        ids.push(tokenizer.eos_id());
        weights.push(1.0);
        ids.resize(len, tokenizer.pad_id());
        weights.resize(len, 1.0);
        Self { ids, weights }
    }

    /// The window of the empty prompt: start, end, padding; every weight 1.
    pub fn empty(tokenizer: &ClipTokenizer) -> Self {
        Self::new(tokenizer, &[])
    }

    /// Whether every weight is exactly 1.
    pub fn is_unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// A piece being built: text (or a `BREAK` when `None`) and its weight so far.
struct Item {
    text: Option<String>,
    weight: f64,
}

/// Parses the weighting syntax (see the [module docs](self)).
///
/// Empty texts are dropped and neighbouring texts of equal weight merged; a prompt without
/// syntax gives one [`Piece::Text`] of weight 1 holding the whole prompt (none when it is
/// empty).
pub fn parse(prompt: &str) -> Vec<Piece> {
    let mut items: Vec<Item> = Vec::new();
    // Indices (into `items`) of the literal placeholders of the open brackets.
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let mut plain = String::new();
    let mut chars = prompt.chars();
    while let Some(c) = chars.next() {
        let after = chars.as_str();
        let mut consumed = 0;
        match c {
            '\\' => {
                let escaped = after.chars().next().filter(|e| "()[]\\".contains(*e));
                flush_plain(&mut plain, &mut items);
                let literal = escaped.unwrap_or('\\');
                consumed += escaped.map_or(0, char::len_utf8);
                push_text(&mut items, literal.to_string());
            }
            '(' | '[' => {
                flush_plain(&mut plain, &mut items);
                let stack = if c == '(' { &mut round } else { &mut square };
                stack.push(items.len());
                push_text(&mut items, c.to_string());
            }
            ':' | ')' | ']' => {
                let closer = match c {
                    ':' => weight_close(after).map(|(factor, len)| (&mut round, factor, len)),
                    ')' => Some((&mut round, BRACKET_FACTOR, 0)),
                    _ => Some((&mut square, 1.0 / BRACKET_FACTOR, 0)),
                };
                match closer.and_then(|(stack, factor, len)| Some((stack.pop()?, factor, len))) {
                    Some((open, factor, len)) => {
                        flush_plain(&mut plain, &mut items);
                        close(&mut items, open, factor);
                        consumed += len;
                    }
                    None => plain.push(c),
                }
            }
            _ => plain.push(c),
        }
        chars = after.get(consumed..).unwrap_or_default().chars();
    }
    flush_plain(&mut plain, &mut items);
    merge(items)
}

/// `\s*number\s*)` at the start of `s` (the rest of a `:number)` weight): the number and the
/// bytes consumed up to and including the `)`.
fn weight_close(s: &str) -> Option<(f64, usize)> {
    let body = s.trim_start();
    let number_len = body
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-'))))
        .map_or(body.len(), |(i, _)| i);
    let number = body.get(..number_len)?;
    let tail = body.get(number_len..)?;
    let closing = tail.trim_start();
    if !closing.starts_with(')') {
        return None;
    }
    let value = number.parse::<f64>().ok()?;
    let consumed = s.len() - closing.len() + 1;
    Some((value, consumed))
}

/// Closes the bracket whose literal placeholder is at `open`: the placeholder is removed and
/// everything after it is multiplied by `factor`.
fn close(items: &mut [Item], open: usize, factor: f64) {
    if let Some((placeholder, inside)) = items.get_mut(open..).and_then(|s| s.split_first_mut()) {
        placeholder.text = Some(String::new());
        for item in inside {
            item.weight *= factor;
        }
    }
}

fn push_text(items: &mut Vec<Item>, text: String) {
    items.push(Item {
        text: Some(text),
        weight: 1.0,
    });
}

/// Moves the plain text collected so far into `items`, split at each `BREAK`.
fn flush_plain(plain: &mut String, items: &mut Vec<Item>) {
    if plain.is_empty() {
        return;
    }
    let text = std::mem::take(plain);
    let mut rest = text.as_str();
    while let Some((before, after)) = split_at_break(rest) {
        push_text(items, before.to_owned());
        items.push(Item {
            text: None,
            weight: 1.0,
        });
        rest = after;
    }
    push_text(items, rest.to_owned());
}

/// The text before and after the first `BREAK` that is a whole word, without the whitespace
/// around it (A1111's `\s*\bBREAK\b\s*`).
fn split_at_break(text: &str) -> Option<(&str, &str)> {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    text.match_indices(BREAK_KEYWORD).find_map(|(start, _)| {
        let before = text.get(..start)?;
        let after = text.get(start + BREAK_KEYWORD.len()..)?;
        let bounded = !is_word(before.chars().next_back()) && !is_word(after.chars().next());
        bounded.then(|| (before.trim_end(), after.trim_start()))
    })
}

/// Drops empty texts and merges neighbouring texts of equal weight.
fn merge(items: Vec<Item>) -> Vec<Piece> {
    let mut pieces: Vec<Piece> = Vec::new();
    for item in items {
        match item.text {
            None => pieces.push(Piece::Break),
            Some(text) if text.is_empty() => {}
            Some(text) => match pieces.last_mut() {
                Some(Piece::Text {
                    text: last,
                    weight: w,
                }) if *w == item.weight => last.push_str(&text),
                _ => pieces.push(Piece::Text {
                    text,
                    weight: item.weight,
                }),
            },
        }
    }
    pieces
}

/// A token of the prompt, or a `BREAK`.
enum Token {
    Id(u32, f32),
    Break,
}

/// Tokenizes each piece on its own (the parsed pieces when `weighting`, else the whole prompt
/// as one literal piece of weight 1).
fn tokens(tokenizer: &ClipTokenizer, prompt: &str, weighting: bool) -> Result<Vec<Token>> {
    let pieces = if weighting {
        parse(prompt)
    } else {
        vec![Piece::Text {
            text: prompt.to_owned(),
            weight: 1.0,
        }]
    };
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Break => out.push(Token::Break),
            Piece::Text { text, weight } => {
                let ids = tokenizer.tokenize_content(&text)?;
                out.extend(ids.into_iter().map(|id| Token::Id(id, weight as f32)));
            }
        }
    }
    Ok(out)
}

/// The windows `tokenizer`'s encoder reads for `prompt`: one or more (always at least one)
/// [`TokenChunk`]s of `max_length` ids.
///
/// With `weighting`, the prompt is parsed with [`parse`]; without, it is literal text of weight
/// 1 (brackets, backslashes and `BREAK` included). A prompt of at most `max_length - 2` tokens
/// without `BREAK` gives one window equal to [`ClipTokenizer::encode`], whatever
/// `long_prompts` says.
///
/// # Errors
/// [`Error::Unsupported`] for a tokenizer whose `max_length` leaves no room for content (2);
/// [`Error::Tokenizer`] when tokenizing fails.
pub fn prompt_chunks(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    weighting: bool,
    long_prompts: LongPrompts,
) -> Result<Vec<TokenChunk>> {
    let window = tokenizer.max_length().saturating_sub(2);
    if window == 0 {
        return Err(Error::unsupported(format!(
            "a tokenizer max_length of {} leaves no room for prompt tokens",
            tokenizer.max_length()
        )));
    }
    let tokens = tokens(tokenizer, prompt, weighting)?;
    match long_prompts {
        LongPrompts::Truncate => {
            let content: Vec<(u32, f32)> = tokens
                .iter()
                .filter_map(|t| match *t {
                    Token::Id(id, w) => Some((id, w)),
                    Token::Break => None,
                })
                .take(window)
                .collect();
            Ok(vec![TokenChunk::new(tokenizer, &content)])
        }
        LongPrompts::Chunk => Ok(chunk(tokenizer, &tokens, window)),
    }
}

/// Lays `tokens` out in windows of `window` content tokens (see [`LongPrompts::Chunk`]).
fn chunk(tokenizer: &ClipTokenizer, tokens: &[Token], window: usize) -> Vec<TokenChunk> {
    let comma = comma_id(tokenizer);
    let mut chunks = Vec::new();
    let mut current: Vec<(u32, f32)> = Vec::with_capacity(window);
    // Position in `current` of its last comma.
    let mut last_comma: Option<usize> = None;
    for token in tokens {
        let (id, weight) = match *token {
            Token::Break => {
                chunks.push(TokenChunk::new(tokenizer, &current));
                current.clear();
                last_comma = None;
                continue;
            }
            Token::Id(id, weight) => (id, weight),
        };
        if Some(id) == comma {
            last_comma = Some(current.len());
        } else if current.len() == window {
            if let Some(at) = last_comma.filter(|&at| window - at <= COMMA_BACKTRACK) {
                let moved = current.split_off(at + 1);
                chunks.push(TokenChunk::new(tokenizer, &current));
                current = moved;
                last_comma = None;
            }
        }
        if current.len() == window {
            chunks.push(TokenChunk::new(tokenizer, &current));
            current.clear();
            last_comma = None;
        }
        current.push((id, weight));
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(TokenChunk::new(tokenizer, &current));
    }
    chunks
}

/// The id of a lone `,` when it is one token.
fn comma_id(tokenizer: &ClipTokenizer) -> Option<u32> {
    match tokenizer.tokenize_content(",").ok()?.as_slice() {
        [id] => Some(*id),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text(text: &str, weight: f64) -> Piece {
        Piece::Text {
            text: text.to_owned(),
            weight,
        }
    }

    #[test]
    fn plain_text_is_one_piece() {
        assert_eq!(
            parse("a red fox, golden hour"),
            [text("a red fox, golden hour", 1.0)]
        );
        assert_eq!(parse(""), []);
        assert_eq!(parse("time: 5 o'clock"), [text("time: 5 o'clock", 1.0)]);
        assert_eq!(
            parse("café (naïve:1.2) 東京\\"),
            [text("café ", 1.0), text("naïve", 1.2), text(" 東京\\", 1.0)]
        );
    }

    #[test]
    fn brackets_weight_and_nest() {
        let f = BRACKET_FACTOR;
        assert_eq!(
            parse("an (important) word"),
            [
                text("an ", 1.0),
                text("important", 1.0 * f),
                text(" word", 1.0)
            ]
        );
        assert_eq!(parse("[quiet]"), [text("quiet", 1.0 / f)]);
        assert_eq!(parse("((very))"), [text("very", 1.0 * f * f)]);
        assert_eq!(
            parse("a ((house:1.3)) [on] a (hill:0.5), sun, (((sky))). (((x:1.3))"),
            [
                text("a ", 1.0),
                text("house", 1.0 * 1.3 * f),
                text(" ", 1.0),
                text("on", 1.0 / f),
                text(" a ", 1.0),
                text("hill", 0.5),
                text(", sun, ", 1.0),
                text("sky", 1.0 * f * f * f),
                text(". (", 1.0),
                text("x", 1.0 * 1.3 * f),
            ]
        );
        assert_eq!(
            parse("[(mixed:1.5)]"),
            [text("mixed", 1.0 * 1.5 * (1.0 / f))]
        );
        // Round and square brackets nest independently.
        assert_eq!(
            parse("(a [b) c]"),
            [text("a ", f), text("b", 1.0 * f / f), text(" c", 1.0 / f)]
        );
    }

    #[test]
    fn explicit_weights_accept_signs_and_spaces() {
        assert_eq!(parse("(w:2)"), [text("w", 2.0)]);
        assert_eq!(parse("(w: 0.25 )"), [text("w", 0.25)]);
        assert_eq!(parse("(w:-1)"), [text("w", -1.0)]);
        assert_eq!(parse("(w:+.5)"), [text("w", 0.5)]);
        assert_eq!(parse("(w:0)"), [text("w", 0.0)]);
        // Not numbers: the colon is text and the bracket closes with the default factor.
        assert_eq!(parse("(w:1.2.3)"), [text("w:1.2.3", BRACKET_FACTOR)]);
        assert_eq!(parse("(w:x)"), [text("w:x", BRACKET_FACTOR)]);
        assert_eq!(parse("(w:)"), [text("w:", BRACKET_FACTOR)]);
        // Without an open round bracket, `:1.5)` is text.
        assert_eq!(parse("w:1.5)"), [text("w:1.5)", 1.0)]);
    }

    #[test]
    fn escapes_are_literal() {
        assert_eq!(parse(r"\(literal\]"), [text("(literal]", 1.0)]);
        assert_eq!(parse(r"a \\ b"), [text(r"a \ b", 1.0)]);
        assert_eq!(parse(r"(\(x\))"), [text("(x)", BRACKET_FACTOR)]);
        assert_eq!(parse(r"a\b \"), [text(r"a\b \", 1.0)]);
        assert_eq!(parse(r"\[x]"), [text("[x]", 1.0)]);
    }

    #[test]
    fn unbalanced_brackets_are_text() {
        assert_eq!(parse("(unbalanced"), [text("(unbalanced", 1.0)]);
        assert_eq!(parse("closed) too]"), [text("closed) too]", 1.0)]);
        assert_eq!(
            parse("((a) b"),
            [text("(", 1.0), text("a", BRACKET_FACTOR), text(" b", 1.0)]
        );
        // An unclosed bracket inside a closed one is literal text at the outer weight.
        assert_eq!(parse("[a (b]"), [text("a (b", 1.0 / BRACKET_FACTOR)]);
        assert_eq!(parse("a [b"), [text("a [b", 1.0)]);
    }

    #[test]
    fn equal_weights_merge() {
        assert_eq!(
            parse("(unnecessary)(parens)"),
            [text("unnecessaryparens", BRACKET_FACTOR)]
        );
        assert_eq!(parse("a (b:1) c"), [text("a b c", 1.0)]);
    }

    #[test]
    fn break_splits_on_whole_words() {
        assert_eq!(
            parse("a cat BREAK a dog"),
            [text("a cat", 1.0), Piece::Break, text("a dog", 1.0)]
        );
        assert_eq!(
            parse("BREAK a\nBREAK\tb BREAK"),
            [
                Piece::Break,
                text("a", 1.0),
                Piece::Break,
                text("b", 1.0),
                Piece::Break
            ]
        );
        assert_eq!(
            parse("(x BREAK y)"),
            [
                text("x", BRACKET_FACTOR),
                Piece::Break,
                text("y", BRACKET_FACTOR)
            ]
        );
        assert_eq!(
            parse("BREAKING break _BREAK"),
            [text("BREAKING break _BREAK", 1.0)]
        );
        assert_eq!(
            parse("a,BREAK,b"),
            [text("a,", 1.0), Piece::Break, text(",b", 1.0)]
        );
    }

    #[test]
    fn weight_close_reads_the_number_and_bracket() {
        assert_eq!(weight_close("1.3)rest"), Some((1.3, 4)));
        assert_eq!(weight_close(" 2 ) x"), Some((2.0, 4)));
        assert_eq!(weight_close("1.3 x)"), None);
        assert_eq!(weight_close("+)"), None);
    }
}
