//! Prompt token counting for the limiter's reservation.
//!
//! Where the model's encoding is known (tiktoken-rs's own model → encoding table:
//! `gpt-4o*`, `gpt-4.1*`, `gpt-4.5*`, `gpt-5*`, `o1*`, `o3*`, `o4-mini*`, `gpt-oss*` →
//! `o200k_base`; `gpt-4*`, `gpt-3.5-turbo*`, Azure's `gpt-35-turbo*` → `cl100k_base`) the
//! prompt is counted with that encoding; any other model keeps the stated estimate
//! ([`estimate_tokens`]). Azure configs name the model (deployments map model →
//! deployment), so Azure calls are counted by model too.
//!
//! Each encoding is built at most once per process, on first use, in a blocking-pool
//! thread rather than on the async runtime (measured in a release build: o200k_base
//! ≈ 46 MB RSS and 0.3 s, cl100k_base ≈ 24 MB and 0.06 s); a worker that runs no `llm`
//! step with a known model never builds one, so its idle RSS is unchanged. Counting is
//! then ≈ 0.5 ms per 18 KB of prompt.

use super::provider::{Message, estimate_tokens};
use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

/// Tokens OpenAI's chat format adds to every message (`<|start|>{role}<|message|>…<|end|>`
/// minus the role itself), per OpenAI's cookbook "How to count tokens with tiktoken".
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`), once per request, per the
/// same cookbook.
pub const REPLY_PRIMING: u64 = 3;
/// Up to this many bytes of message content are counted on the async runtime once the
/// encoding is loaded (well under a millisecond); a longer prompt is counted in a
/// blocking-pool thread.
const INLINE_MAX_BYTES: usize = 16 * 1024;

/// A BPE encoding this worker can count with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    /// The encoding of `model`, from tiktoken-rs's model table; `None` for models it does
    /// not know (and for its legacy completion-only encodings).
    pub fn for_model(model: &str) -> Option<Self> {
        use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
        match get_tokenizer(model)? {
            // o200k_harmony is o200k_base plus special tokens; ordinary text counts alike.
            Tokenizer::O200kBase | Tokenizer::O200kHarmony => Some(Self::O200kBase),
            Tokenizer::Cl100kBase => Some(Self::Cl100kBase),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::O200kBase => "o200k_base",
            Self::Cl100kBase => "cl100k_base",
        }
    }

    fn slot(self) -> &'static OnceLock<Option<CoreBPE>> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Self::O200kBase => &O200K,
            Self::Cl100kBase => &CL100K,
        }
    }

    /// Whether the encoding is built (or failed to build), so using it will not block.
    fn ready(self) -> bool {
        self.slot().get().is_some()
    }

    /// The encoding, built on first use (blocking; see the module docs). `None` only if
    /// the crate's embedded data failed to load, which is logged once.
    fn bpe(self) -> Option<&'static CoreBPE> {
        self.slot()
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let r = match self {
                    Self::O200kBase => tiktoken_rs::o200k_base(),
                    Self::Cl100kBase => tiktoken_rs::cl100k_base(),
                };
                match r {
                    Ok(b) => {
                        tracing::info!(
                            encoding = self.name(),
                            ms = started.elapsed().as_millis() as u64,
                            "token encoding loaded"
                        );
                        Some(b)
                    }
                    Err(e) => {
                        tracing::warn!(encoding = self.name(), error = %e, "token encoding failed to load: prompts are estimated");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Ordinary-text tokens of `text` (special-token strings count as plain text, as the
    /// API treats them in message content).
    pub fn count_text(self, text: &str) -> Option<u64> {
        self.bpe().map(|b| b.count_ordinary(text) as u64)
    }

    /// Tokens of a chat prompt: per message [`TOKENS_PER_MESSAGE`] + role + content, plus
    /// [`REPLY_PRIMING`] once (OpenAI's documented chat-format overhead; messages here have
    /// no `name`).
    pub fn count_chat(self, messages: &[Message]) -> Option<u64> {
        let b = self.bpe()?;
        let body: u64 = messages
            .iter()
            .map(|m| {
                TOKENS_PER_MESSAGE
                    + b.count_ordinary(&m.role) as u64
                    + b.count_ordinary(&m.content) as u64
            })
            .sum();
        Some(body + REPLY_PRIMING)
    }
}

/// A prompt's token count and how it was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptTokens {
    pub tokens: u64,
    /// `Some(encoding)` when counted with the model's tokenizer, `None` when estimated.
    pub encoding: Option<Encoding>,
}

/// The stated estimate, for models without a known encoding.
fn estimated(messages: &[Message]) -> PromptTokens {
    PromptTokens {
        tokens: estimate_tokens(messages),
        encoding: None,
    }
}

/// Counts `messages` for `model`, blocking to build the encoding on first use.
pub fn prompt_tokens(model: &str, messages: &[Message]) -> PromptTokens {
    Encoding::for_model(model)
        .and_then(|enc| {
            enc.count_chat(messages).map(|tokens| PromptTokens {
                tokens,
                encoding: Some(enc),
            })
        })
        .unwrap_or_else(|| estimated(messages))
}

/// [`prompt_tokens`] for async callers: the first use of an encoding (which builds it) and
/// long prompts run on the blocking pool, so a runtime thread is never held for long.
pub async fn prompt_tokens_async(model: &str, messages: &[Message]) -> PromptTokens {
    let Some(enc) = Encoding::for_model(model) else {
        return estimated(messages);
    };
    let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
    if enc.ready() && bytes <= INLINE_MAX_BYTES {
        return prompt_tokens(model, messages);
    }
    let (model, owned) = (model.to_string(), messages.to_vec());
    tokio::task::spawn_blocking(move || prompt_tokens(&model, &owned))
        .await
        .unwrap_or_else(|_| estimated(messages))
}

/// Tokens of a reply's text for `model`: counted when its encoding is already loaded (it
/// is whenever the prompt was counted), else ⌈chars/4⌉. Never builds an encoding.
pub fn text_tokens(model: &str, text: &str) -> u64 {
    Encoding::for_model(model)
        .filter(|e| e.ready())
        .and_then(|e| e.count_text(text))
        .unwrap_or_else(|| (text.chars().count() as u64).div_ceil(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn models_map_to_their_encodings() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-08-06",
            "gpt-4.1",
            "gpt-4.1-mini",
            "o1",
            "o1-mini",
            "o3",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
        ] {
            assert_eq!(Encoding::for_model(m), Some(Encoding::O200kBase), "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "gpt-35-turbo",
        ] {
            assert_eq!(Encoding::for_model(m), Some(Encoding::Cl100kBase), "{m}");
        }
        for m in [
            "m1",
            "llama3",
            "mistral-large",
            "claude-3-5-sonnet",
            "text-davinci-003",
        ] {
            assert_eq!(Encoding::for_model(m), None, "{m}");
        }
    }

    // Published counts: "hello world" is [15339, 1917] in cl100k_base and [24912, 2375] in
    // o200k_base; OpenAI's cookbook gives 6 tokens for "tiktoken is great!" and 7 for
    // "2 + 2 = 4" in both, and 9 (cl100k_base) / 8 (o200k_base) for "お誕生日おめでとう".
    #[test]
    fn known_strings_count_as_published() {
        let o = Encoding::O200kBase;
        let c = Encoding::Cl100kBase;
        assert_eq!(c.count_text("hello world"), Some(2));
        assert_eq!(o.count_text("hello world"), Some(2));
        assert_eq!(c.count_text("tiktoken is great!"), Some(6));
        assert_eq!(o.count_text("tiktoken is great!"), Some(6));
        assert_eq!(c.count_text("2 + 2 = 4"), Some(7));
        assert_eq!(o.count_text("2 + 2 = 4"), Some(7));
        assert_eq!(c.count_text("お誕生日おめでとう"), Some(9));
        assert_eq!(o.count_text("お誕生日おめでとう"), Some(8));
        let ids = |e: Encoding| e.bpe().unwrap().encode_ordinary("hello world");
        assert_eq!(ids(c), vec![15339, 1917]);
        assert_eq!(ids(o), vec![24912, 2375]);
    }

    // OpenAI's API reference example (system "You are a helpful assistant.", user
    // "Hello!") reports `prompt_tokens: 19`: 2 × (3 + 1 role token) + 6 + 2 + 3.
    #[test]
    fn a_chat_adds_the_documented_overhead() {
        let chat = [
            msg("system", "You are a helpful assistant."),
            msg("user", "Hello!"),
        ];
        for model in ["gpt-4o-mini", "gpt-4o", "gpt-4"] {
            let p = prompt_tokens(model, &chat);
            assert_eq!(p.tokens, 19, "{model}");
            assert!(p.encoding.is_some());
        }
        // N messages add 3 each plus their role, and the reply priming once.
        let one = prompt_tokens("gpt-4o", &[msg("user", "hello world")]);
        assert_eq!(one.tokens, 3 + 1 + 2 + 3);
        let three = prompt_tokens(
            "gpt-4.1",
            &[
                msg("system", "hello world"),
                msg("user", "hello world"),
                msg("assistant", "hello world"),
            ],
        );
        assert_eq!(three.tokens, 3 * (3 + 1 + 2) + 3);
        assert_eq!(prompt_tokens("gpt-4o", &[]).tokens, REPLY_PRIMING);
    }

    #[test]
    fn unknown_models_keep_the_estimate() {
        let chat = [msg("user", "hello world, how are you?")];
        let p = prompt_tokens("m1", &chat);
        assert_eq!(p.encoding, None);
        assert_eq!(p.tokens, estimate_tokens(&chat));
        assert_eq!(p.tokens, 25u64.div_ceil(4) + 4);
        assert_eq!(text_tokens("m1", "abcde"), 2);
    }

    #[tokio::test]
    async fn async_counting_matches_and_handles_long_prompts() {
        let chat = [msg("user", "hello world")];
        let p = prompt_tokens_async("gpt-4o", &chat).await;
        assert_eq!(p.tokens, 9);
        assert_eq!(p.encoding, Some(Encoding::O200kBase));
        // Long enough to go to the blocking pool: "hello world" × n is 2n tokens or fewer.
        let long = [msg("user", &"hello world ".repeat(2_000))];
        let p = prompt_tokens_async("gpt-4o", &long).await;
        assert_eq!(p, prompt_tokens("gpt-4o", &long));
        assert!(
            p.tokens > 2_000 && p.tokens < 24_000 / 4 + 10,
            "{}",
            p.tokens
        );
        assert_eq!(prompt_tokens_async("m1", &chat).await, estimated(&chat));
        assert_eq!(text_tokens("gpt-4o", "hello world"), 2);
    }
}
