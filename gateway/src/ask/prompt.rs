//! The `%%ask` syntax, and what is said to the model: a system prompt describing the sandbox,
//! and a user prompt with the context a person asking would expect the model to know (recent
//! cells and outputs, variables with their types and shapes, DataFrame columns, files in
//! `/workspace`, installed packages), cut to a size. Values of variables are not sent (short
//! numbers aside), and names that look like secrets are sent without anything about them.

use serde_json::Value;

/// What `%%ask --help` prints.
pub const USAGE: &str = "\
%%ask [--model NAME] [--provider NAME] [--no-run] [--explain]
<what you want, in plain words>

  Writes Python for the prompt with a language model, shows it as it arrives, runs it in this
  kernel's sandbox, and offers it as a new cell below. If the code raises, the model gets the
  error and a few attempts to fix it. The model sees the recent cells, your variables' names,
  types and shapes, and the files in /workspace; never your data's values or any key.

  --model NAME      the model to use (see %ask models)
  --provider NAME   the provider to use
  --no-run          show the code, do not run it
  --explain         also explain the code

%ask models         lists the configured providers and models
%ask? or %%ask --help   shows this
";

/// What a magic cell asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Show the usage.
    Help,
    /// List the models.
    Models,
    /// Ask.
    Ask(Options),
}

/// The options of an ask.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The prompt.
    pub prompt: String,
    /// `--model`.
    pub model: Option<String>,
    /// `--provider`.
    pub provider: Option<String>,
    /// `--no-run`.
    pub no_run: bool,
    /// `--explain`.
    pub explain: bool,
}

/// Whether a cell is an ask magic (and so served by the gateway).
pub fn is_ask(code: &str) -> bool {
    let first = code
        .trim_start()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end();
    first == "%%ask"
        || first.starts_with("%%ask ")
        || first == "%ask"
        || first.starts_with("%ask ")
        || first.starts_with("%ask?")
}

/// Parses an ask cell; `Err` is a usage error in words.
pub fn parse(code: &str) -> Result<Command, String> {
    let code = code.trim_start();
    let (first, rest) = code.split_once('\n').unwrap_or((code, ""));
    let first = first.trim_end();
    let (cell, args) = if let Some(a) = first.strip_prefix("%%ask") {
        (true, a)
    } else if let Some(a) = first.strip_prefix("%ask") {
        (false, a)
    } else {
        return Err("not an %%ask cell".into());
    };
    if args.trim() == "?" || args.starts_with('?') {
        return Ok(Command::Help);
    }
    let words: Vec<&str> = args.split_whitespace().collect();
    if !cell {
        return match words.as_slice() {
            ["models"] => Ok(Command::Models),
            ["--help"] | ["help"] => Ok(Command::Help),
            [] => Ok(Command::Help),
            _ => Err(format!(
                "%ask takes `models` or `?`; to ask for code, use the cell magic:\n%%ask\n{}",
                words.join(" ")
            )),
        };
    }
    let mut options = Options::default();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        match w {
            "--help" | "-h" => return Ok(Command::Help),
            "--no-run" => options.no_run = true,
            "--explain" => options.explain = true,
            "--model" | "--provider" => {
                let value = it
                    .next()
                    .ok_or_else(|| format!("{w} needs a value\n\n{USAGE}"))?;
                if w == "--model" {
                    options.model = Some(value.to_owned());
                } else {
                    options.provider = Some(value.to_owned());
                }
            }
            other => {
                if let Some((k, v)) = other.split_once('=')
                    && (k == "--model" || k == "--provider")
                {
                    if k == "--model" {
                        options.model = Some(v.to_owned());
                    } else {
                        options.provider = Some(v.to_owned());
                    }
                    continue;
                }
                return Err(format!("unknown option {other:?}\n\n{USAGE}"));
            }
        }
    }
    options.prompt = rest.trim().to_owned();
    if options.prompt.is_empty() {
        return Err(format!(
            "%%ask needs a prompt on the lines below it\n\n{USAGE}"
        ));
    }
    Ok(Command::Ask(options))
}

/// What the model is told about the kernel.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Recent cells: (code, outputs as text).
    pub cells: Vec<(String, String)>,
    /// The kernel's `describe()` of its variables.
    pub variables: Vec<Value>,
    /// Files in `/workspace`: (path, bytes).
    pub files: Vec<(String, u64)>,
    /// Notable packages installed.
    pub packages: Vec<String>,
}

/// The system prompt.
pub fn system(packages: &[String], explain: bool) -> String {
    let packages = if packages.is_empty() {
        "numpy, pandas, scipy, scikit-learn, statsmodels, matplotlib, seaborn".to_owned()
    } else {
        packages.join(", ")
    };
    let tail = if explain {
        "After the code block, explain in at most three sentences what the code does."
    } else {
        "Do not add explanations outside the code block."
    };
    format!(
        "You write Python for one Jupyter notebook cell. It runs in a sandboxed CPython 3.15 kernel \
         that keeps its state between cells: use the existing variables when they fit. There is \
         no network access, no pip, and no subprocesses. Files are in /workspace, the current \
         directory. Installed packages include {packages}. matplotlib figures are shown inline \
         automatically at the end of the cell; do not call plt.show() or save them unless asked. \
         The value of the last expression is displayed (a DataFrame as a table). Reply with \
         exactly one ```python code block holding the complete code to run. {tail}"
    )
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} …", &text[..end])
}

fn variable_line(v: &Value) -> String {
    let mut line = format!(
        "- {}: {}",
        v["name"].as_str().unwrap_or("?"),
        v["type"].as_str().unwrap_or("?")
    );
    for key in ["module", "signature", "value", "len", "dtype", "note"] {
        if let Some(x) = v.get(key) {
            let text = x.as_str().map_or_else(|| x.to_string(), str::to_owned);
            line.push_str(&format!(", {key} {text}"));
        }
    }
    if let Some(shape) = v["shape"].as_array() {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        line.push_str(&format!(", shape ({})", dims.join(", ")));
    }
    if let Some(cols) = v["columns"].as_object() {
        let cols: Vec<String> = cols
            .iter()
            .map(|(c, t)| format!("{c}: {}", t.as_str().unwrap_or("?")))
            .collect();
        line.push_str(&format!(", columns {{{}}}", cols.join(", ")));
    }
    line
}

/// The user prompt: context sections (each within its share of `max_chars`), then the task.
pub fn user(task: &str, context: &Context, max_chars: usize) -> String {
    let share = max_chars / 3;
    let mut out = String::new();
    if !context.cells.is_empty() {
        let mut cells = String::new();
        for (code, output) in context.cells.iter().rev() {
            let mut block = format!("```python\n{}\n```\n", cut(code, 1500));
            if !output.trim().is_empty() {
                block.push_str(&format!("Output:\n```\n{}\n```\n", cut(output, 800)));
            }
            if cells.len() + block.len() > share {
                break;
            }
            cells = block + &cells;
        }
        out.push_str("## Recent cells (oldest first)\n");
        out.push_str(&cells);
        out.push('\n');
    }
    if !context.variables.is_empty() {
        let mut vars = String::new();
        for v in &context.variables {
            let line = cut(&variable_line(v), 600);
            if vars.len() + line.len() > share {
                vars.push_str("- …\n");
                break;
            }
            vars.push_str(&line);
            vars.push('\n');
        }
        out.push_str("## Variables in the kernel\n");
        out.push_str(&vars);
        out.push('\n');
    }
    if !context.files.is_empty() {
        let mut files = String::new();
        for (path, size) in &context.files {
            let line = format!("- {path} ({size} bytes)\n");
            if files.len() + line.len() > share {
                files.push_str("- …\n");
                break;
            }
            files.push_str(&line);
        }
        out.push_str("## Files in /workspace\n");
        out.push_str(&files);
        out.push('\n');
    }
    out.push_str("## Task\n");
    out.push_str(task);
    out
}

/// What the model is told when its code raised.
pub fn repair(ename: &str, evalue: &str, traceback: &[String]) -> String {
    let tb = cut(&traceback.join("\n"), 4000);
    format!(
        "Running that code raised {ename}: {evalue}\n\nTraceback:\n```\n{tb}\n```\n\nFix the code. \
         Reply with one ```python block holding the complete corrected code."
    )
}

/// The code in a reply: its first fenced block (```python, ```py or ```), else all of it.
pub fn extract_code(text: &str) -> String {
    let mut lines = text.lines();
    let mut in_block = false;
    let mut code = Vec::new();
    for line in lines.by_ref() {
        let t = line.trim();
        if !in_block {
            if let Some(lang) = t.strip_prefix("```") {
                let lang = lang.trim();
                if lang.is_empty()
                    || lang.eq_ignore_ascii_case("python")
                    || lang.eq_ignore_ascii_case("py")
                    || lang.eq_ignore_ascii_case("python3")
                {
                    in_block = true;
                }
            }
            continue;
        }
        if t == "```" {
            return code.join("\n");
        }
        code.push(line);
    }
    if in_block {
        // An unclosed block: what there is of it.
        return code.join("\n");
    }
    text.trim().to_owned()
}

/// The prose around the code block, if any (for `--explain`).
pub fn explanation(text: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            out.push(line);
        }
    }
    let prose = out.join("\n").trim().to_owned();
    (!prose.is_empty()).then_some(prose)
}

/// Removes ANSI colour codes (tracebacks carry them).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_magic() {
        assert!(is_ask("%%ask\nplot it"));
        assert!(is_ask("  %%ask --no-run\nx"));
        assert!(is_ask("%ask?"));
        assert!(!is_ask("%%asking\nx"));
        assert!(!is_ask("print('%%ask')"));
        assert_eq!(parse("%ask?"), Ok(Command::Help));
        assert_eq!(parse("%%ask --help\n"), Ok(Command::Help));
        assert_eq!(parse("%ask models"), Ok(Command::Models));
        let Ok(Command::Ask(o)) =
            parse("%%ask --model m1 --provider=p --no-run --explain\nload sales.csv\nplot it")
        else {
            panic!("not parsed");
        };
        assert_eq!(o.model.as_deref(), Some("m1"));
        assert_eq!(o.provider.as_deref(), Some("p"));
        assert!(o.no_run && o.explain);
        assert_eq!(o.prompt, "load sales.csv\nplot it");
        assert!(
            parse("%%ask --colour red\nx")
                .unwrap_err()
                .contains("unknown option")
        );
        assert!(parse("%%ask\n   ").unwrap_err().contains("needs a prompt"));
        assert!(
            parse("%%ask --model\nx")
                .unwrap_err()
                .contains("needs a value")
        );
    }

    #[test]
    fn extracts_code_and_prose() {
        let text = "Here you go:\n```python\nimport pandas as pd\nprint(1)\n```\nIt prints 1.";
        assert_eq!(extract_code(text), "import pandas as pd\nprint(1)");
        assert_eq!(explanation(text).unwrap(), "Here you go:\nIt prints 1.");
        assert_eq!(extract_code("print(2)"), "print(2)");
        assert_eq!(extract_code("```\nx = 1\n"), "x = 1");
        assert_eq!(
            strip_ansi("\u{1b}[0;31mValueError\u{1b}[0m: bad"),
            "ValueError: bad"
        );
    }

    #[test]
    fn context_is_capped_and_names_columns() {
        let context = Context {
            cells: (0..50)
                .map(|i| (format!("x{i} = {i}"), "y".repeat(500)))
                .collect(),
            variables: vec![
                serde_json::json!({"name": "df", "type": "pandas.DataFrame", "shape": [3, 2],
                "columns": {"month": "object", "revenue": "int64"}}),
            ],
            files: (0..1000).map(|i| (format!("f{i}.csv"), 10)).collect(),
            packages: vec![],
        };
        let text = user("plot revenue", &context, 6000);
        assert!(text.len() < 7000, "{}", text.len());
        assert!(text.contains("columns {month: object, revenue: int64}"));
        assert!(text.contains("x49 = 49"), "the newest cells are kept");
        assert!(text.ends_with("## Task\nplot revenue"));
    }
}
