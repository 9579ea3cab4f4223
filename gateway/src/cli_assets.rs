//! Man pages and shell completions generated from the clap definitions (the binary's
//! `gateway completions SHELL` and hidden `gateway generate-man DIR`), so the Debian
//! package ships what the binary's `--help` says, never a copy that drifts.
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Writes `gateway.1` and one page per visible subcommand (`gateway-serve.1`, ...)
/// into `dir`, creating it.
pub fn write_man_pages<C: CommandFactory>(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(C::command(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))
}

/// Writes the completion script for `shell` to standard output.
pub fn print_completions<C: CommandFactory>(shell: clap_complete::Shell) -> Result<()> {
    let mut command = C::command();
    let name = command.get_name().to_owned();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, name, &mut out);
    Ok(())
}
