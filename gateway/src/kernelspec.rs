//! The kernelspecs the gateway offers and their resources (logos), shaped as Jupyter Server's
//! `/api/kernelspecs` returns them.
//!
//! One sandbox, two names: `sandgate-python` (the default, the name `sandgate-kernel install`
//! writes) and `python3`, the name every notebook written elsewhere carries in its metadata and
//! that papermill, nbclient and JupyterLab's REST API start kernels by. A `python3` kernel is the
//! same Sandgate sandbox; its display name says so.

use serde_json::{Value, json};

/// The default kernelspec's name (the same one `sandgate-kernel install` writes).
pub const NAME: &str = "sandgate-python";
/// What frontends show for it.
pub const DISPLAY_NAME: &str = "Python 3 (Sandgate sandbox)";
/// The name notebooks written for ipykernel carry: the same sandbox under Jupyter's usual name.
pub const PYTHON3: &str = "python3";
/// What frontends show for `python3`.
pub const PYTHON3_DISPLAY_NAME: &str = "Python 3 (Sandgate sandbox, as python3)";

/// Every kernelspec offered: (name, display name). All run the same sandbox.
pub const SPECS: &[(&str, &str)] = &[(NAME, DISPLAY_NAME), (PYTHON3, PYTHON3_DISPLAY_NAME)];

/// The display name of kernelspec `name`, if the gateway offers it.
pub fn display_name(name: &str) -> Option<&'static str> {
    SPECS.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

/// A resource file of the kernelspec.
pub struct Resource {
    /// The file name under `/kernelspecs/{name}/`.
    pub file: &'static str,
    /// Its key in the spec's `resources` map.
    pub key: &'static str,
    /// The content type it is served with.
    pub content_type: &'static str,
    /// The bytes.
    pub body: &'static [u8],
}

/// The logos.
pub const RESOURCES: &[Resource] = &[
    Resource {
        file: "logo-32x32.png",
        key: "logo-32x32",
        content_type: "image/png",
        body: include_bytes!("../resources/logo-32x32.png"),
    },
    Resource {
        file: "logo-64x64.png",
        key: "logo-64x64",
        content_type: "image/png",
        body: include_bytes!("../resources/logo-64x64.png"),
    },
    Resource {
        file: "logo-svg.svg",
        key: "logo-svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../resources/logo.svg"),
    },
];

/// The names offered, for messages: `"sandgate-python", "python3"`.
pub fn names() -> String {
    SPECS
        .iter()
        .map(|(n, _)| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The resource `file` of kernelspec `name`, if there is one.
pub fn resource(name: &str, file: &str) -> Option<&'static Resource> {
    display_name(name).and_then(|_| RESOURCES.iter().find(|r| r.file == file))
}

/// The spec (`kernel.json` content) shown under `display_name`. `argv` is informational: the
/// gateway launches kernels itself, and clients never run it.
fn spec(display_name: &str) -> Value {
    json!({
        "argv": ["sandgate-kernel", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {"debugger": false, "sandgate": {"sandbox": "wasmtime"}},
    })
}

/// The entry of `/api/kernelspecs` for `name`, if the gateway offers it: `name`, `spec` and
/// `resources` (URLs relative to the server, under `/kernelspecs/`, as Jupyter Server serves
/// them).
pub fn model(name: &str) -> Option<Value> {
    let display_name = display_name(name)?;
    let resources: serde_json::Map<String, Value> = RESOURCES
        .iter()
        .map(|r| {
            (
                r.key.to_owned(),
                Value::String(format!("/kernelspecs/{name}/{}", r.file)),
            )
        })
        .collect();
    Some(json!({"name": name, "spec": spec(display_name), "resources": resources}))
}

/// `GET /api/kernelspecs`.
pub fn all() -> Value {
    let specs: serde_json::Map<String, Value> = SPECS
        .iter()
        .filter_map(|(name, _)| Some(((*name).to_owned(), model(name)?)))
        .collect();
    json!({"default": NAME, "kernelspecs": specs})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_served_and_well_formed() {
        for (name, display) in SPECS {
            let m = model(name).unwrap();
            assert_eq!(m["spec"]["display_name"], *display);
            for r in RESOURCES {
                assert_eq!(
                    m["resources"][r.key],
                    format!("/kernelspecs/{name}/{}", r.file)
                );
                assert!(resource(name, r.file).is_some());
            }
        }
        assert!(model("python2").is_none());
        assert_eq!(all()["kernelspecs"].as_object().unwrap().len(), SPECS.len());
        assert!(RESOURCES[0].body.starts_with(b"\x89PNG"));
        assert!(resource("other", "logo-64x64.png").is_none());
        assert!(resource(NAME, "../kernel.json").is_none());
    }
}
