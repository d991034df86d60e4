//! The plan driver: a scripted agent that proposes the steps of a TOML file, in order.
//!
//! ```toml
//! agent = "planner"            # optional; the run spec's agent wins when both are given
//!
//! [[step]]
//! intent = "read the greeting"
//! capability = "fs.read"
//! target = "hello.txt"
//!
//! [[step]]
//! intent = "make it friendlier"
//! capability = "fs.write"
//! target = "hello.txt"
//! arguments = { content = "hello, world\n" }
//!
//! [[step]]
//! intent = "say why"
//! think = "hypothesis_generated"    # any cognitive kind, snake_case
//! text = "the greeting was too terse"
//!
//! [[step]]
//! intent = "poll until told to stop"
//! capability = "http.request"
//! target = "http://127.0.0.1:8080/status"
//! repeat = 1000                      # the same proposal, 1000 times
//!
//! [[step]]
//! finish = "greeting updated"       # optional: the plan also finishes after its last step
//! ```
//!
//! The driver is deterministic: the proposal for step `n` depends only on the file and `n`, so a
//! resumed run (whose [`AgentView::step`] continues the count) picks up exactly where it stopped.

use std::fmt;
use std::path::Path;

use ice_kernel::{Agent, AgentError, AgentView, CapabilityProposal, Payload, Proposal, Thought};
use serde::Deserialize;
use serde_json::Value;

/// Most steps (counting repeats) a plan may expand to.
pub const MAX_EXPANDED_STEPS: u64 = 1_000_000;
/// Largest plan file read.
pub use ice_kernel::limits::MAX_PLAN_BYTES;

/// A plan that could not be used: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PlanError {
    /// The file (as given).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.problem),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.problem),
            _ => write!(f, "{}: {}", self.file, self.problem),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    agent: Option<String>,
    #[serde(default)]
    step: Vec<toml::Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    intent: Option<String>,
    capability: Option<String>,
    target: Option<String>,
    arguments: Option<toml::Value>,
    think: Option<String>,
    text: Option<String>,
    finish: Option<String>,
    repeat: Option<i64>,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The proposal it makes.
    pub proposal: Proposal,
    /// How many times in a row.
    pub repeat: u64,
    /// Its line in the file.
    pub line: usize,
}

/// A parsed plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The agent id the file names, if any.
    pub agent: Option<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

fn thought_named(name: &str) -> Option<Thought> {
    let aliases = [
        ("inference_step", Thought::InferenceStep),
        ("decision_proposed", Thought::DecisionProposed),
        ("decision", Thought::DecisionProposed),
        ("hypothesis_generated", Thought::HypothesisGenerated),
        ("hypothesis", Thought::HypothesisGenerated),
        ("uncertainty_declared", Thought::UncertaintyDeclared),
        ("uncertainty", Thought::UncertaintyDeclared),
        ("plan_step_proposed", Thought::PlanStepProposed),
        ("plan_step", Thought::PlanStepProposed),
        ("assumption_declared", Thought::AssumptionDeclared),
        ("assumption", Thought::AssumptionDeclared),
    ];
    aliases.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

impl Plan {
    /// Parse a plan; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Plan, PlanError> {
        let err = |offset: Option<usize>, problem: String| {
            let (line, column) = match offset {
                Some(o) => {
                    let (l, c) = line_col(text, o);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            PlanError {
                file: file.to_string(),
                line,
                column,
                problem,
            }
        };
        let raw: RawPlan = toml::from_str(text).map_err(|e| {
            err(
                e.span().map(|s| s.start),
                e.message().trim_end().to_string(),
            )
        })?;
        let mut steps = Vec::with_capacity(raw.step.len());
        let mut total: u64 = 0;
        for (i, spanned) in raw.step.into_iter().enumerate() {
            let offset = spanned.span().start;
            let n = i + 1;
            let at = |problem: String| err(Some(offset), format!("step {n}: {problem}"));
            let s = spanned.into_inner();
            let kinds = [
                s.capability.is_some(),
                s.think.is_some(),
                s.finish.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(at(
                    "give exactly one of `capability`, `think` or `finish`".into()
                ));
            }
            let repeat = match s.repeat {
                None => 1,
                Some(r) if r >= 1 && (r as u64) <= MAX_EXPANDED_STEPS => r as u64,
                Some(r) => {
                    return Err(at(format!(
                        "repeat = {r}: must be between 1 and {MAX_EXPANDED_STEPS}"
                    )));
                }
            };
            let intent = || -> Result<String, PlanError> {
                match &s.intent {
                    Some(i) if !i.trim().is_empty() => Ok(i.clone()),
                    _ => Err(at("every proposal needs an `intent` (why)".into())),
                }
            };
            let proposal = if let Some(capability) = &s.capability {
                if s.think.is_some() || s.text.is_some() {
                    return Err(at("`text` belongs to a `think` step".into()));
                }
                let Some(target) = &s.target else {
                    return Err(at(format!("`{capability}` needs a `target`")));
                };
                let arguments = match s.arguments.clone().map(toml_to_json) {
                    None => Value::Object(Default::default()),
                    Some(v @ Value::Object(_)) => v,
                    Some(_) => return Err(at("`arguments` must be a table".into())),
                };
                Proposal::Request(CapabilityProposal {
                    capability: capability.clone(),
                    target: target.clone(),
                    arguments,
                    intent: intent()?,
                })
            } else if let Some(kind) = &s.think {
                let Some(kind) = thought_named(kind) else {
                    return Err(at(format!(
                        "unknown thought kind {kind:?}; use one of inference_step, decision_proposed, hypothesis_generated, uncertainty_declared, plan_step_proposed, assumption_declared"
                    )));
                };
                if s.target.is_some() || s.arguments.is_some() {
                    return Err(at(
                        "`target` and `arguments` belong to a capability step".into()
                    ));
                }
                let mut payload = Payload::new();
                payload.insert(
                    "text".into(),
                    Value::String(s.text.clone().unwrap_or_default()),
                );
                Proposal::Think {
                    kind,
                    intent: intent()?,
                    payload,
                }
            } else {
                if s.target.is_some() || s.arguments.is_some() || s.text.is_some() {
                    return Err(at("a `finish` step takes nothing else".into()));
                }
                if s.repeat.is_some() {
                    return Err(at("a `finish` step cannot repeat".into()));
                }
                Proposal::Finish {
                    summary: s.finish.clone().unwrap_or_default(),
                }
            };
            total = total.saturating_add(repeat);
            if total > MAX_EXPANDED_STEPS {
                return Err(at(format!(
                    "the plan expands to more than {MAX_EXPANDED_STEPS} proposals"
                )));
            }
            let (line, _) = line_col(text, offset);
            steps.push(Step {
                proposal,
                repeat,
                line,
            });
        }
        if let Some(agent) = &raw.agent
            && ice_kernel::Origin::Agent(agent.clone())
                .to_string()
                .parse::<ice_kernel::Origin>()
                .is_err()
        {
            return Err(err(
                None,
                format!("agent {agent:?} is not a valid agent id"),
            ));
        }
        Ok(Plan {
            agent: raw.agent,
            steps,
        })
    }

    /// Read and parse a plan file.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let file = path.display().to_string();
        let io = |e: std::io::Error| PlanError {
            file: file.clone(),
            line: None,
            column: None,
            problem: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        // A device or a pipe has no size to check and may never end.
        if !meta.is_file() {
            return Err(PlanError {
                file,
                line: None,
                column: None,
                problem: "not a regular file".into(),
            });
        }
        if meta.len() > MAX_PLAN_BYTES {
            return Err(PlanError {
                file,
                line: None,
                column: None,
                problem: format!(
                    "{} bytes; a plan may have at most {MAX_PLAN_BYTES}",
                    meta.len()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Plan::parse(&file, &text)
    }

    /// The proposal at position `n` of the expanded plan (repeats counted), or `None` past the end.
    pub fn proposal(&self, mut n: u64) -> Option<&Proposal> {
        for s in &self.steps {
            if n < s.repeat {
                return Some(&s.proposal);
            }
            n -= s.repeat;
        }
        None
    }
}

/// The scripted agent.
pub struct PlanAgent {
    id: String,
    plan: Plan,
}

impl PlanAgent {
    /// An agent `id` following `plan`.
    pub fn new(id: impl Into<String>, plan: Plan) -> PlanAgent {
        PlanAgent {
            id: id.into(),
            plan,
        }
    }
}

impl Agent for PlanAgent {
    fn id(&self) -> &str {
        &self.id
    }

    fn propose(&mut self, view: &AgentView) -> Result<Proposal, AgentError> {
        Ok(match self.plan.proposal(view.step) {
            Some(p) => p.clone(),
            None => Proposal::Finish {
                summary: "plan complete".into(),
            },
        })
    }
}
