//! The Lua scripts, one per atomic transition (`shared/lua/*.lua`), each prefixed with a
//! prelude of constants generated from the Rust definitions and shared helpers.
//!
//! `redis::Script` runs `EVALSHA` and falls back to loading the script on `NOSCRIPT`, so a
//! restarted or failed-over server (empty script cache) is handled on the next call.

use crate::keys::field;
use crate::status::{ProcessStatus, StepStatus, outcome};
use std::sync::OnceLock;

const PRELUDE: &str = include_str!("../lua/prelude.lua");

fn constants() -> String {
    let mut s = String::new();
    let mut c = |name: &str, value: &str| {
        s.push_str(&format!("local {name} = {value:?}\n"));
    };
    c("PS_PENDING", ProcessStatus::Pending.as_str());
    c("PS_RUNNING", ProcessStatus::Running.as_str());
    c("PS_WAITING", ProcessStatus::WaitingForApproval.as_str());
    for st in StepStatus::ALL {
        c(
            &format!("SS_{}", st.as_str().to_ascii_uppercase()),
            st.as_str(),
        );
    }
    c("F_STATUS", field::STATUS);
    c("F_TYPE", field::TYPE);
    c("F_VERSION", field::VERSION);
    c("F_REV", field::REV);
    c("F_OUTPUT_PREFIX", field::OUTPUT_PREFIX);
    c("F_CHECKPOINT_PREFIX", field::CHECKPOINT_PREFIX);
    c("OUTCOME_FAILED", outcome::FAILED);
    for (name, n) in [
        ("MAX_ENTRY_FIELDS", crate::envelope::MAX_ENTRY_FIELDS),
        ("MAX_COPIED_FIELDS", crate::envelope::MAX_COPIED_FIELDS),
    ] {
        s.push_str(&format!("local {name} = {n}\n"));
    }
    s
}

/// Every script, compiled once per process.
pub struct Scripts {
    pub begin: redis::Script,
    pub heartbeat: redis::Script,
    pub checkpoint: redis::Script,
    pub complete: redis::Script,
    pub release: redis::Script,
    pub reclaim: redis::Script,
    pub promote: redis::Script,
    pub commit: redis::Script,
    pub drop_entry: redis::Script,
    pub retire_consumer: redis::Script,
    pub purge: redis::Script,
    pub llm_limit: redis::Script,
    pub llm_budget: redis::Script,
    pub trim: redis::Script,
}

/// The sources, by name, for tests and tooling.
pub const SOURCES: &[(&str, &str)] = &[
    ("begin", include_str!("../lua/begin.lua")),
    ("heartbeat", include_str!("../lua/heartbeat.lua")),
    ("checkpoint", include_str!("../lua/checkpoint.lua")),
    ("complete", include_str!("../lua/complete.lua")),
    ("release", include_str!("../lua/release.lua")),
    ("reclaim", include_str!("../lua/reclaim.lua")),
    ("promote", include_str!("../lua/promote.lua")),
    ("commit", include_str!("../lua/commit.lua")),
    ("drop_entry", include_str!("../lua/drop_entry.lua")),
    (
        "retire_consumer",
        include_str!("../lua/retire_consumer.lua"),
    ),
    ("purge", include_str!("../lua/purge.lua")),
    ("llm_limit", include_str!("../lua/llm_limit.lua")),
    ("llm_budget", include_str!("../lua/llm_budget.lua")),
    ("trim", include_str!("../lua/trim.lua")),
];

/// The full text of one script as sent to Redis.
pub fn full_source(name: &str) -> Option<String> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, body)| format!("{}{PRELUDE}\n{body}", constants()))
}

impl Scripts {
    pub fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| {
            let s = |name: &str| redis::Script::new(&full_source(name).expect("script exists"));
            Scripts {
                begin: s("begin"),
                heartbeat: s("heartbeat"),
                checkpoint: s("checkpoint"),
                complete: s("complete"),
                release: s("release"),
                reclaim: s("reclaim"),
                promote: s("promote"),
                commit: s("commit"),
                drop_entry: s("drop_entry"),
                retire_consumer: s("retire_consumer"),
                purge: s("purge"),
                llm_limit: s("llm_limit"),
                llm_budget: s("llm_budget"),
                trim: s("trim"),
            }
        })
    }

    /// Loads every script into the server's cache (on connect, before pipelines use them).
    pub async fn load_all<C: redis::aio::ConnectionLike>(conn: &mut C) -> redis::RedisResult<()> {
        let s = Self::get();
        for script in [
            &s.begin,
            &s.heartbeat,
            &s.checkpoint,
            &s.complete,
            &s.release,
            &s.reclaim,
            &s.promote,
            &s.commit,
            &s.drop_entry,
            &s.retire_consumer,
            &s.purge,
            &s.llm_limit,
            &s.llm_budget,
            &s.trim,
        ] {
            script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_field_has_a_source() {
        // `Scripts::get` panics when a field names a script missing from SOURCES.
        let _ = Scripts::get();
    }

    #[test]
    fn every_script_has_a_header_and_uses_only_keys_from_keys() {
        for (name, body) in SOURCES {
            let first = body.lines().next().unwrap();
            assert!(first.starts_with(&format!("-- {name}:")), "{name} header");
            assert!(body.contains("KEYS[1]"), "{name} documents KEYS");
            // No key names are built inside scripts: nothing concatenates onto a prefix.
            assert!(!body.contains("honua:"), "{name} builds a key");
            assert!(
                !body.contains("'KEYS'") && !body.contains("SCAN"),
                "{name} scans"
            );
        }
    }

    #[test]
    fn prelude_defines_every_constant_scripts_use() {
        let consts = constants();
        let all = SOURCES
            .iter()
            .map(|(_, b)| *b)
            .chain([PRELUDE])
            .collect::<Vec<_>>()
            .join("\n");
        for word in all.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let is_const = (word.starts_with("PS_")
                || word.starts_with("SS_")
                || word.starts_with("F_")
                || word.starts_with("OUTCOME_"))
                && word.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            if is_const {
                assert!(
                    consts.contains(&format!("local {word} =")),
                    "{word} is used but not generated"
                );
            }
        }
    }
}
