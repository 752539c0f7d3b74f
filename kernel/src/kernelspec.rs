//! The kernelspec (`sandgate-python`) that lets any Jupyter frontend start this kernel, and the
//! same kernel under Jupyter's usual name, `python3`, for notebooks written for ipykernel.

use std::path::{Path, PathBuf};

use serde_json::json;

/// The kernelspec's name.
pub const NAME: &str = "sandgate-python";
/// What frontends show.
pub const DISPLAY_NAME: &str = "Python 3 (Sandgate sandbox)";
/// The name notebooks written for ipykernel carry in their metadata.
pub const PYTHON3: &str = "python3";
/// What frontends show for this kernel installed as `python3`.
pub const PYTHON3_DISPLAY_NAME: &str = "Python 3 (Sandgate sandbox, as python3)";

/// The display name for the kernelspec `name`, if this kernel can be installed under it.
pub fn display_name(name: &str) -> Option<&'static str> {
    match name {
        NAME => Some(DISPLAY_NAME),
        PYTHON3 => Some(PYTHON3_DISPLAY_NAME),
        _ => None,
    }
}

/// `kernel.json` for a kernel binary at `exe`, with `extra` arguments before `-f`, shown as
/// `display_name`.
pub fn kernel_json(exe: &Path, extra: &[String], display_name: &str) -> serde_json::Value {
    let mut argv = vec![exe.display().to_string()];
    argv.extend(extra.iter().cloned());
    argv.push("-f".into());
    argv.push("{connection_file}".into());
    json!({
        "argv": argv,
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"debugger": false, "sandgate": {"sandbox": "wasmtime"}},
    })
}

/// Writes the kernelspec `name` (see [`display_name`]) into `kernels_dir/NAME/` and returns
/// that folder.
pub fn install(
    kernels_dir: &Path,
    name: &str,
    exe: &Path,
    extra: &[String],
) -> std::io::Result<PathBuf> {
    let display_name = display_name(name).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("this kernel installs as {NAME:?} or {PYTHON3:?}, not {name:?}"),
        )
    })?;
    let dir = kernels_dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let body =
        serde_json::to_vec_pretty(&kernel_json(exe, extra, display_name)).expect("JSON serialises");
    let tmp = dir.join("kernel.json.tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, dir.join("kernel.json"))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_ends_with_connection_file() {
        let spec = kernel_json(
            Path::new("/bin/k"),
            &["--home".into(), "/h".into()],
            DISPLAY_NAME,
        );
        let argv: Vec<&str> = spec["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(argv, ["/bin/k", "--home", "/h", "-f", "{connection_file}"]);
        assert_eq!(spec["interrupt_mode"], "message");
    }

    #[test]
    fn installs_under_either_name_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        for name in [NAME, PYTHON3] {
            let at = install(dir.path(), name, Path::new("/bin/k"), &[]).unwrap();
            let spec: serde_json::Value =
                serde_json::from_slice(&std::fs::read(at.join("kernel.json")).unwrap()).unwrap();
            assert_eq!(spec["display_name"], display_name(name).unwrap());
        }
        let err = install(dir.path(), "python2", Path::new("/bin/k"), &[]).unwrap_err();
        assert!(err.to_string().contains("python3"), "{err}");
        assert!(!dir.path().join("python2").exists());
    }
}
