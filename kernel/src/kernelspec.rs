//! The kernelspec (`sandgate-python`) that lets any Jupyter frontend start this kernel.

use std::path::{Path, PathBuf};

use serde_json::json;

/// The kernelspec's name.
pub const NAME: &str = "sandgate-python";
/// What frontends show.
pub const DISPLAY_NAME: &str = "Python 3 (Sandgate sandbox)";

/// `kernel.json` for a kernel binary at `exe`, with `extra` arguments before `-f`.
pub fn kernel_json(exe: &Path, extra: &[String]) -> serde_json::Value {
    let mut argv = vec![exe.display().to_string()];
    argv.extend(extra.iter().cloned());
    argv.push("-f".into());
    argv.push("{connection_file}".into());
    json!({
        "argv": argv,
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"debugger": false, "sandgate": {"sandbox": "wasmtime"}},
    })
}

/// Writes the kernelspec into `kernels_dir/sandgate-python/` and returns that folder.
pub fn install(kernels_dir: &Path, exe: &Path, extra: &[String]) -> std::io::Result<PathBuf> {
    let dir = kernels_dir.join(NAME);
    std::fs::create_dir_all(&dir)?;
    let body = serde_json::to_vec_pretty(&kernel_json(exe, extra)).expect("JSON serialises");
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
        let spec = kernel_json(Path::new("/bin/k"), &["--home".into(), "/h".into()]);
        let argv: Vec<&str> = spec["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(argv, ["/bin/k", "--home", "/h", "-f", "{connection_file}"]);
        assert_eq!(spec["interrupt_mode"], "message");
    }
}
