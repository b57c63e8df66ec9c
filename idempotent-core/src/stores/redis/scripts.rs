//! The Lua scripts, one per operation, each prefixed with the shared prelude.

use redis::Script;

const PRELUDE: &str = include_str!("prelude.lua");

pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
    pub(super) extend: Script,
    pub(super) in_progress: Script,
}

fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            claim: with_prelude(include_str!("claim.lua")),
            complete: with_prelude(include_str!("complete.lua")),
            release: with_prelude(include_str!("release.lua")),
            extend: with_prelude(include_str!("extend.lua")),
            in_progress: with_prelude(include_str!("in_progress.lua")),
        }
    }
}
