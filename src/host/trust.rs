//! Files socklens trusts (agent config, policies, TLS keys and CAs) must be
//! writable only by their owner, and owned by root or by socklens' own user,
//! as sshd's StrictModes asks of its files. Files socklens writes are private.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Why a file is not read.
#[derive(Debug)]
pub enum Refused {
    Io(io::Error),
    /// Mode bits (permission part) that let group or others write it.
    Writable(u32),
    /// Owner uid: neither root nor the user socklens runs as.
    Owner(u32),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Writable(mode) => write!(
                f,
                "writable by group or others (mode {mode:04o}): not trusted (chmod go-w)"
            ),
            Self::Owner(uid) => write!(
                f,
                "owned by uid {uid}, not root or socklens' user: not trusted (chown root)"
            ),
        }
    }
}

fn check(meta: &std::fs::Metadata) -> Result<(), Refused> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Refused::Writable(mode));
    }
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(Refused::Owner(uid));
    }
    Ok(())
}

/// Opens a trusted file, checking the file opened (not the path, which could
/// change in between).
pub fn open_trusted(path: &Path) -> Result<File, Refused> {
    let f = File::open(path).map_err(Refused::Io)?;
    check(&f.metadata().map_err(Refused::Io)?)?;
    Ok(f)
}

/// The text of a trusted file.
pub fn read_trusted(path: &Path) -> Result<String, Refused> {
    let mut text = String::new();
    open_trusted(path)?
        .read_to_string(&mut text)
        .map_err(Refused::Io)?;
    Ok(text)
}

/// The bytes of a trusted file, or one line naming it and the problem.
pub fn read_trusted_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    open_trusted(path)
        .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Refused::Io))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}

/// Opens a file socklens appends to: 0600, or 0640 readable by `group`,
/// whatever mode an existing file had.
pub fn open_private_append(path: &Path, group: Option<u32>) -> io::Result<File> {
    let mode = if group.is_some() { 0o640 } else { 0o600 };
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .open(path)?;
    if let Some(gid) = group {
        nix::unistd::fchown(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            None,
            Some(nix::unistd::Gid::from_raw(gid)),
        )?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn group_or_other_writable_files_are_refused_and_written_files_are_private() {
        let dir = std::env::temp_dir().join(format!("sl-trust-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.toml");
        fs::write(&p, "x = 1\n").unwrap();
        for (mode, ok) in [(0o644, true), (0o600, true), (0o664, false), (0o646, false)] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let r = read_trusted(&p);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if !ok {
                let msg = r.unwrap_err().to_string();
                assert!(msg.contains(&format!("mode 0{mode:o}")), "{msg}");
            }
        }
        let log = dir.join("events.jsonl");
        fs::write(&log, "").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
        let f = open_private_append(&log, None).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }
}
