//! The bot's configuration (`/etc/gpuops/bot.toml`). Filled in by the bot role.

use std::path::Path;

use crate::config::{read_file, ConfigErrors, Reader};

#[derive(Debug, Clone, Default)]
pub struct BotConfig {}

impl BotConfig {
    pub fn from_file(path: &Path) -> Result<BotConfig, ConfigErrors> {
        let text = read_file(path)?;
        BotConfig::from_str(path, &text)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<BotConfig, ConfigErrors> {
        let (mut r, root) = Reader::parse(path, text)?;
        r.finish(root);
        r.into_result().map(|()| BotConfig {})
    }
}
