//! The Cedar schema policies are validated against.

use cedar_policy as cedar;

use crate::diagnostic::{Diagnostic, Location, Severity, from_cedar};
use crate::nesting;

/// ICE's schema, `crates/authority/schema/ice.cedarschema`, built into the binary.
pub const ICE_SCHEMA_TEXT: &str = include_str!("../schema/ice.cedarschema");

/// The name [`Schema::ice`] gives its text in diagnostics.
pub const ICE_SCHEMA_FILE: &str = "ice.cedarschema";

/// A parsed Cedar schema, with the warnings Cedar gave about it.
#[derive(Debug, Clone)]
pub struct Schema {
    cedar: cedar::Schema,
    warnings: Vec<Diagnostic>,
}

/// A schema that could not be parsed; each diagnostic names the file, line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema {file} is invalid: {}", diagnostics.first().map(ToString::to_string).unwrap_or_default())]
pub struct SchemaError {
    /// The schema file.
    pub file: String,
    /// Every problem found.
    pub diagnostics: Vec<Diagnostic>,
}

impl Schema {
    /// ICE's own schema.
    pub fn ice() -> Result<Schema, SchemaError> {
        Schema::parse(ICE_SCHEMA_FILE, ICE_SCHEMA_TEXT)
    }

    /// Parse a schema in Cedar's schema syntax; `file` names it in diagnostics. A schema nested
    /// deeper than [`MAX_SCHEMA_NESTING`](crate::limits::MAX_SCHEMA_NESTING) is refused before
    /// Cedar parses it (recursively).
    pub fn parse(file: &str, text: &str) -> Result<Schema, SchemaError> {
        if let Err(deep) = nesting::check_schema_text(text) {
            return Err(SchemaError {
                file: file.to_string(),
                diagnostics: vec![Diagnostic {
                    severity: Severity::Error,
                    file: file.to_string(),
                    location: Some(Location::of_offset(text, deep.offset)),
                    policy: None,
                    message: deep.message,
                    help: Some(deep.help),
                }],
            });
        }
        match cedar::Schema::from_cedarschema_str(text) {
            Ok((cedar, warnings)) => {
                let warnings = warnings
                    .map(|w| from_cedar(Severity::Warning, file, text, None, &w))
                    .collect();
                Ok(Schema { cedar, warnings })
            }
            Err(e) => Err(SchemaError {
                file: file.to_string(),
                diagnostics: vec![from_cedar(Severity::Error, file, text, None, &e)],
            }),
        }
    }

    /// What Cedar warned about when parsing the schema (for example, shadowed names).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// The Cedar schema.
    pub fn cedar(&self) -> &cedar::Schema {
        &self.cedar
    }
}
