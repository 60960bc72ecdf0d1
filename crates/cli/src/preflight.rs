//! Checks made before a command starts its run, so that a mistake in the arguments costs no
//! run: output files that cannot be written are found now, not after minutes of scanning.

use crate::error::CliError;
use crate::merge::LiveOpts;
use std::path::Path;

/// `path` (given with `flag`) can be created or replaced: it is not a directory, its
/// directory exists, and a file can be created there (tried, then removed). The Prometheus
/// file is replaced through a temporary file in the same directory, the plot written in
/// place; both need exactly this.
pub fn check_output(path: &Path, flag: &str) -> Result<(), CliError> {
    let shown = path.display();
    if path.is_dir() {
        return Err(CliError::Usage(format!(
            "{flag} {shown} is a directory; give a file name"
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "{flag} {shown}: the directory {} does not exist",
            dir.display()
        )));
    }
    let probe = dir.join(format!(".samepage-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| {
            CliError::Usage(format!(
                "{flag} {shown}: cannot create files in {}: {e}",
                dir.display()
            ))
        })?;
    let _ = std::fs::remove_file(&probe);
    if path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| CliError::Usage(format!("{flag} {shown} cannot be written: {e}")))?;
    }
    Ok(())
}

/// The output files of a live command.
pub fn check_outputs(live: &LiveOpts) -> Result<(), CliError> {
    if let Some(p) = &live.plot {
        check_output(p, "--plot")?;
    }
    if let Some(p) = &live.prometheus {
        check_output(p, "--prometheus")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_cannot_be_written_are_refused() {
        let dir = std::env::temp_dir().join(format!("samepage-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(check_output(&dir.join("a.svg"), "--plot").is_ok());
        assert!(
            !dir.join("a.svg").exists(),
            "the check leaves nothing behind"
        );
        let e = check_output(&dir, "--plot").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = check_output(&dir.join("no/such/dir/a.svg"), "--prometheus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_output(Path::new("/proc/samepage.prom"), "--prometheus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot create files in /proc"), "{e}");
        assert!(check_output(Path::new("relative-name.svg"), "--plot").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
