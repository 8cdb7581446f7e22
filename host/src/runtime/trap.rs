//! What a trap means to the person reading the run history.
//!
//! A guest that fails outside its `result` traps: a Rust panic, an uncaught
//! Python exception (componentize-py prints the traceback, then traps), a
//! JavaScript exception that is not the run's `failure`. wasmtime's error then
//! leads with a wasm backtrace of a kilobyte or more, and the guest's own
//! words sit at the end of its stderr. The history records them the other
//! way round: the guest's error first, then the trap's cause; the backtrace
//! goes to the log only.

use wasmtime::WasmBacktrace;

/// A trap, split for the record.
#[derive(Debug)]
pub struct TrapReport {
    /// The guest's own error message, found in its output: the panic message
    /// of a Rust guest, the last line of a Python traceback, the exception of
    /// a JavaScript guest.
    pub guest: Option<String>,
    /// The trap's cause chain without the wasm backtrace (`wasm trap: wasm
    /// \`unreachable\` instruction executed`).
    pub cause: String,
    /// The wasm backtrace, for the log.
    pub backtrace: Option<String>,
}

impl TrapReport {
    /// Splits `trap`; `output` is the guest's captured stdout and stderr.
    /// `last_error`: the guest's latest error-level log message, taken as
    /// its error when the output holds none and it reads like one (a panic
    /// the SDK logged in a plugin built without WASI).
    pub fn new(trap: &wasmtime::Error, output: &str, last_error: Option<&str>) -> Self {
        // The backtrace is a context of the error: one link of its chain.
        let backtrace = trap
            .downcast_ref::<WasmBacktrace>()
            .map(ToString::to_string);
        let causes: Vec<String> = trap
            .chain()
            .map(|e| e.to_string())
            .filter(|e| Some(e) != backtrace.as_ref())
            .collect();
        Self {
            guest: guest_error(output).or_else(|| last_error.and_then(guest_error)),
            cause: causes.join(": "),
            backtrace,
        }
    }

    /// One line for the run history: the guest's error, then the cause.
    pub fn message(&self) -> String {
        match &self.guest {
            Some(g) => format!("{g} (plugin trapped: {})", self.cause),
            None => format!("plugin trapped: {}", self.cause),
        }
    }
}

/// The guest's own error message in its output, where there is one.
fn guest_error(output: &str) -> Option<String> {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    // Python: the traceback ends in `ValueError: ...`. Before the
    // Rust panic: componentize-py's runtime panics after the traceback.
    if let Some(i) = lines
        .iter()
        .rposition(|l| l.starts_with("Traceback (most recent call last)"))
    {
        // The frames are indented; the exception is the first line that is not.
        let exception = lines[i + 1..].iter().find(|l| !l.starts_with(' '));
        return exception.map(|l| (*l).to_owned());
    }
    // Rust: `thread '<unnamed>' panicked at src/lib.rs:10:5:` then the
    // message, then a `note: run with RUST_BACKTRACE=1` line.
    // Logged by the SDK without WASI, the line starts `panicked at`.
    if let Some(i) = lines
        .iter()
        .rposition(|l| l.contains(" panicked at ") || l.starts_with("panicked at "))
    {
        let at = lines[i].split_once("panicked at ").map_or("", |(_, at)| at);
        let message: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| !l.starts_with("note: "))
            .copied()
            .collect();
        return Some(format!(
            "panicked at {}: {}",
            at.trim_end_matches(':'),
            message.join(" | ")
        ));
    }
    // A JavaScript exception and its stack: the first line that reads like
    // an error. Other output is not taken for the guest's error.
    lines
        .iter()
        .find(|l| is_error_line(l))
        .map(|l| l.trim().to_owned())
}

/// `Error: ...`, `TypeError: ...`, `Uncaught RangeError: ...`.
fn is_error_line(line: &str) -> bool {
    let line = line.trim_start().trim_start_matches("Uncaught ");
    line.split_once(": ").is_some_and(|(name, _)| {
        name.ends_with("Error") && name.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::guest_error;

    #[test]
    fn finds_the_guests_own_words() {
        let rust = "thread '<unnamed>' panicked at src/lib.rs:132:17:\ndeliberate panic\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            guest_error(rust).unwrap(),
            "panicked at src/lib.rs:132:17: deliberate panic"
        );
        let python = "Traceback (most recent call last):\n  File \"app.py\", line 3, in run\n    int('x')\nValueError: invalid literal for int() with base 10: 'x'\n\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\nPython function threw an unexpected exception\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            guest_error(python).unwrap(),
            "ValueError: invalid literal for int() with base 10: 'x'"
        );
        let js = "log line\nError: config key `A` is not a plain table name\n  run@app.js:30:15\n";
        assert_eq!(
            guest_error(js).unwrap(),
            "Error: config key `A` is not a plain table name"
        );
        let logged = "panicked at src/lib.rs:9:5:\nno rows";
        assert_eq!(
            guest_error(logged).unwrap(),
            "panicked at src/lib.rs:9:5: no rows"
        );
        assert_eq!(guest_error("progress: 10 rows\n"), None);
        assert_eq!(guest_error(""), None);
    }
}
