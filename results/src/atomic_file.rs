//! Writing a file whole or not at all: a temporary file in the target's
//! folder, synced, then renamed over the target.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a reader sees the old file or the
/// new one, never a part. The file gets the mode a plain `File::create`
/// would give it (0666 less the umask), not a temporary file's 0600.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".flawscope-").suffix(".tmp");
    // open(2) takes the umask off this mode, as for any new file: reading
    // the umask would mean setting it, which races with other threads.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out.csv");
        write_atomically(&target, b"first").unwrap();
        write_atomically(&target, b"second").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        let missing = tmp.path().join("no/such/folder/out.csv");
        assert!(write_atomically(&missing, b"x").is_err());
    }

    /// Under the usual 0022 umask a plain create gives 0644; a temporary
    /// file would be 0600.
    #[cfg(unix)]
    #[test]
    fn the_file_gets_the_mode_of_a_plain_create() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let target = tmp.path().join("atomic");
        write_atomically(&target, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), mode(&plain));
    }
}
