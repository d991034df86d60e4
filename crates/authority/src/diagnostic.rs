//! Diagnostics about policy and schema files, located by file, line and column.

use std::fmt;

/// How serious a diagnostic is. Errors stop a policy set from loading; warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The file cannot be used as it is.
    Error,
    /// The file can be used but probably does not say what its author meant.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// A place in a text file: 1-based line, and 1-based column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, in characters (not bytes).
    pub column: u32,
}

impl Location {
    /// The location of byte `offset` in `text` (clamped to the end of the text, and moved back
    /// to the start of the character it falls in).
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        Location {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem found in a policy or schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file, as it was named when loaded (a policy file's name within its directory).
    pub file: String,
    /// Where in the file, when known.
    pub location: Option<Location>,
    /// The policy concerned, when there is one.
    pub policy: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is advice.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(at) => write!(f, "{}:{at}: {}: {}", self.file, self.severity, self.message)?,
            None => write!(f, "{}: {}: {}", self.file, self.severity, self.message)?,
        }
        if let Some(policy) = &self.policy
            && !self.message.contains(policy.as_str())
        {
            write!(f, " (policy {policy})")?;
        }
        if let Some(help) = &self.help {
            write!(f, "; help: {help}")?;
        }
        Ok(())
    }
}

/// A diagnostic from one of Cedar's errors or warnings, located with its first labelled span
/// (Cedar reports byte offsets into the text it parsed).
pub(crate) fn from_cedar(
    severity: Severity,
    file: &str,
    text: &str,
    policy: Option<String>,
    error: &dyn miette::Diagnostic,
) -> Diagnostic {
    let mut message = error.to_string();
    let mut location = None;
    if let Some(mut labels) = error.labels()
        && let Some(label) = labels.next()
    {
        location = Some(Location::of_offset(text, label.offset()));
        if let Some(what) = label.label()
            && !what.is_empty()
            && !message.contains(what)
        {
            message = format!("{message} ({what})");
        }
    }
    Diagnostic {
        severity,
        file: file.to_string(),
        location,
        policy,
        message,
        help: error.help().map(|h| h.to_string()),
    }
}
