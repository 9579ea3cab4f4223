//! Reading the shared secret files: `auth.secret_files = [new, old, ...]` (or the
//! single `auth.secret_file`). Credentials derived from any of them are accepted;
//! new ones come from the first. A file others may read is refused, at start and
//! on reload, as ssh refuses a private key others can read: the secret is all it
//! takes to issue credentials.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::proto::credentials::SharedSecret;

/// Why the secret files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read the secret file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is readable or writable by its group or by others.
    #[error(
        "the secret file {path} has loose permissions {mode:04o} (readable or writable by group or others); make it readable by the gateway's user only: chmod 600 {path}"
    )]
    LoosePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file holds nothing but whitespace.
    #[error("the secret file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// No file was given.
    #[error("no secret file given")]
    None,
}

/// Permission bits a secret file must not have: any for group or others.
const LOOSE: u32 = 0o077;

/// Reads one secret file: it must exist, be readable by this process, have no
/// permission bits for group or others, and hold more than whitespace.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let read = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & LOOSE != 0 {
        return Err(SecretError::LoosePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let secret = std::fs::read(path).map_err(read)?;
    if secret.trim_ascii().is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(secret)
}

/// Reads every secret file, the current secret first, into one [`SharedSecret`]
/// that accepts credentials derived from any of them.
pub fn load(paths: &[PathBuf]) -> Result<SharedSecret, SecretError> {
    let (first, older) = paths.split_first().ok_or(SecretError::None)?;
    let mut secret = SharedSecret::new(&read_secret_file(first)?);
    for path in older {
        secret = secret.with_previous(&read_secret_file(path)?);
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn secrets_load_in_order_and_loose_or_empty_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("gw-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let new = write(&dir, "new", "new secret\n", 0o600);
        let old = write(&dir, "old", "old secret\n", 0o400);
        let secret = load(&[new.clone(), old.clone()]).expect("both load");
        assert_eq!(secret.len(), 2);
        assert_eq!(
            secret.password("1:a"),
            SharedSecret::new(b"new secret").password("1:a"),
            "the first is the current one"
        );
        let loose = write(&dir, "loose", "secret", 0o644);
        let err = load(&[new.clone(), loose.clone()]).expect_err("group/world readable");
        let text = err.to_string();
        assert!(text.contains(&loose.display().to_string()), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
        assert!(text.contains("0644"), "{text}");
        let group = write(&dir, "group", "secret", 0o640);
        assert!(matches!(
            load(&[group]),
            Err(SecretError::LoosePermissions { mode: 0o640, .. })
        ));
        let empty = write(&dir, "empty", " \n", 0o600);
        assert!(matches!(load(&[empty]), Err(SecretError::Empty { .. })));
        let missing = dir.join("missing");
        let err = load(std::slice::from_ref(&missing)).expect_err("missing");
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert!(matches!(load(&[]), Err(SecretError::None)));
        std::fs::remove_dir_all(&dir).ok();
    }
}
