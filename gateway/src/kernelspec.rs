//! The kernelspec the gateway offers (`sandgate-python`) and its resources (logos), shaped as
//! Jupyter Server's `/api/kernelspecs` returns them.

use serde_json::{Value, json};

/// The kernelspec's name (the same one `sandgate-kernel install` writes).
pub const NAME: &str = "sandgate-python";
/// What frontends show.
pub const DISPLAY_NAME: &str = "Python 3 (Sandgate sandbox)";

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

/// The resource `file` of kernelspec `name`, if there is one.
pub fn resource(name: &str, file: &str) -> Option<&'static Resource> {
    (name == NAME)
        .then(|| RESOURCES.iter().find(|r| r.file == file))
        .flatten()
}

/// The spec (`kernel.json` content). `argv` is informational: the gateway launches kernels
/// itself, and clients never run it.
pub fn spec() -> Value {
    json!({
        "argv": ["sandgate-kernel", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {"debugger": false, "sandgate": {"sandbox": "wasmtime"}},
    })
}

/// One entry of `/api/kernelspecs`: `name`, `spec` and `resources` (URLs relative to the
/// server, under `/kernelspecs/`, as Jupyter Server serves them).
pub fn model() -> Value {
    let resources: serde_json::Map<String, Value> = RESOURCES
        .iter()
        .map(|r| {
            (
                r.key.to_owned(),
                Value::String(format!("/kernelspecs/{NAME}/{}", r.file)),
            )
        })
        .collect();
    json!({"name": NAME, "spec": spec(), "resources": resources})
}

/// `GET /api/kernelspecs`.
pub fn all() -> Value {
    json!({"default": NAME, "kernelspecs": {NAME: model()}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_served_and_well_formed() {
        let m = model();
        for r in RESOURCES {
            assert_eq!(
                m["resources"][r.key],
                format!("/kernelspecs/{NAME}/{}", r.file)
            );
            assert!(resource(NAME, r.file).is_some());
        }
        assert!(RESOURCES[0].body.starts_with(b"\x89PNG"));
        assert!(resource("other", "logo-64x64.png").is_none());
        assert!(resource(NAME, "../kernel.json").is_none());
    }
}
