//! The agent drivers a run spec names, built for a run (`ice run`, resume) or for a replay
//! that re-drives them from the record (`ice replay --drive`).

use anyhow::{Result, anyhow};
use ice_intelligence::{LlmAgent, LlmConfig, Plan, PlanAgent, RecordedModel};
use ice_kernel::Agent;
use ice_runtime::RunSpec;
use serde_json::{Map, Value};

/// The driver of `spec`, ready to run: a plan, or an LLM over its configured endpoint.
pub(crate) fn load_agent(spec: &RunSpec) -> Result<Box<dyn Agent>> {
    match spec.driver.as_str() {
        "plan" => Ok(Box::new(plan_agent(spec)?)),
        "llm" => {
            let config = llm_config(spec)?;
            let agent = LlmAgent::http(spec.agent.clone(), config)
                .map_err(|e| anyhow!("{}: {e}", spec.file.display()))?;
            Ok(Box::new(agent))
        }
        other => Err(anyhow!(
            "{}: [agent] driver {other:?} has no agent to run here; an external agent connects through the MCP gateway (ice mcp --run-spec FILE, or ice serve)",
            spec.file.display()
        )),
    }
}

/// A driver that re-drives a recorded run: the plan again, or the LLM driver answered by the
/// run's recorded inferences (no model is called).
pub(crate) enum Replayer {
    /// The plan driver (its plan file is read again from where the run read it).
    Plan(PlanAgent),
    /// The LLM driver over the recorded replies.
    Llm(Box<LlmAgent>),
}

impl Replayer {
    pub(crate) fn agent(&mut self) -> &mut dyn Agent {
        match self {
            Replayer::Plan(a) => a,
            Replayer::Llm(a) => a.as_mut(),
        }
    }

    /// What the recorded model found (requests whose digest differs from the record).
    pub(crate) fn divergences(&self) -> Vec<String> {
        match self {
            Replayer::Plan(_) => Vec::new(),
            Replayer::Llm(a) => a.divergences().to_vec(),
        }
    }
}

/// The replaying driver for a recorded spec, or why there is none.
pub(crate) fn replayer(
    spec: &RunSpec,
    recorded: Vec<Map<String, Value>>,
) -> Result<Replayer, String> {
    match spec.driver.as_str() {
        "plan" => plan_agent(spec)
            .map(Replayer::Plan)
            .map_err(|e| e.to_string()),
        "llm" => {
            let config = llm_config(spec).map_err(|e| e.to_string())?;
            Ok(Replayer::Llm(Box::new(LlmAgent::new(
                spec.agent.clone(),
                config,
                Box::new(RecordedModel::new(recorded)),
            ))))
        }
        other => Err(format!(
            "the run's agent was driven from outside ICE (driver {other:?}); only its recorded proposals can be replayed, not its reasoning"
        )),
    }
}

fn llm_config(spec: &RunSpec) -> Result<LlmConfig> {
    let raw = spec
        .llm
        .as_ref()
        .ok_or_else(|| anyhow!("{}: [agent.llm] is missing", spec.file.display()))?;
    LlmConfig::from_value(raw).map_err(|e| anyhow!("{}: {e}", spec.file.display()))
}

fn plan_agent(spec: &RunSpec) -> Result<PlanAgent> {
    let Some(plan_file) = &spec.plan else {
        return Err(anyhow!(
            "{}: [agent] driver {:?} has no plan",
            spec.file.display(),
            spec.driver
        ));
    };
    // A run started from a plan continues (resumed) or is re-driven (replayed) by that same
    // plan, or not at all: a file changed since would drive it to other proposals.
    if let Some(then) = &spec.plan_sha256 {
        let now = ice_runtime::spec::plan_digest(plan_file).map_err(|e| anyhow!("{e}"))?;
        if &now != then {
            return Err(anyhow!(
                "{}: the plan file is not the one the run was started with (sha256 {then} then, {now} now); put that plan back to drive the run",
                plan_file.display()
            ));
        }
    }
    let plan = Plan::load(plan_file).map_err(|e| anyhow!("{e}"))?;
    if let Some(a) = &plan.agent
        && a != &spec.agent
    {
        return Err(anyhow!(
            "{}: the plan is for agent {a:?} but the run spec names {:?}",
            plan_file.display(),
            spec.agent
        ));
    }
    Ok(PlanAgent::new(spec.agent.clone(), plan))
}
