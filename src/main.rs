//! The `deja` command-line program.

fn main() -> anyhow::Result<()> {
    Ok(())
}
