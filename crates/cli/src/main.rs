//! `ice`: the command line of the ICE runtime.
//!
//! Exit codes (stable, for scripts): 0 success; 1 error (bad input, I/O, internal); 2 usage;
//! 3 a run ended aborted or failed validation; 4 a run is suspended or waiting for an operator;
//! 5 `verify` or `verify-proof` found the log or a proof invalid, or a checkpoint was refused
//! because what it would cover does not verify.

mod agents;
mod audit;
mod bench;
mod bench_backends;
mod bench_mcp;
mod gateway;
mod home;
mod inspect;
mod memory;
mod policy;
mod replay;
mod run;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code: the log or a proof is invalid.
pub const EXIT_INVALID: u8 = 5;

#[derive(Parser)]
#[command(name = "ice", version, about = "ICE: the governed execution runtime for AI agents", long_about = None)]
struct Cli {
    /// The installation directory (else $ICE_HOME, else ./.ice).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// The log backend URL, overriding the config: sqlite:PATH, postgres://USER@HOST:PORT/DB?schema=NAME or nats://HOST:PORT?prefix=NAME.
    #[arg(long, global = true, value_name = "URL")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new installation: config, checkpoint signing key, an empty log and a starter
    /// policy.
    Init {
        /// The checkpoint origin (the log's public name); a random `ice.local/<id>` if absent.
        #[arg(long)]
        origin: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List events, filtered by run and type; --follow keeps printing new ones.
    Log(inspect::LogArgs),
    /// Show one event by id (RUN_ID:RUN_SEQ).
    Show(inspect::ShowArgs),
    /// List runs with their state and size.
    Runs(inspect::RunsArgs),
    /// Verify the whole log: hashes, chains, law, Merkle tree, checkpoints, blobs. Exit 5 if invalid.
    Verify(audit::VerifyArgs),
    /// Sign a checkpoint of the log as it is now (C2SP tlog-checkpoint, Ed25519).
    Checkpoint(audit::CheckpointArgs),
    /// Write an inclusion proof of an event (or a consistency proof between checkpoints) to a file.
    Prove(audit::ProveArgs),
    /// Check a proof file offline, with only the log's public key. Exit 5 if invalid.
    VerifyProof(audit::VerifyProofArgs),
    /// Copy a whole log into an empty one on another backend (sqlite:PATH, postgres://…,
    /// nats://…) and verify the copy: same events, same hashes, same Merkle tree.
    Migrate(audit::MigrateArgs),
    /// Check the Cedar policies (`policy check`) and explain how they decide a request
    /// (`policy explain`).
    Policy(policy::PolicyArgs),
    /// Run a run spec: the agent proposes, ICE decides, acts and records; staged writes land
    /// only at commit, after validation. Exit 0 committed, 3 aborted, 4 suspended.
    Run(run::RunArgs),
    /// A run's staged (or applied) changes.
    Diff(run::DiffArgs),
    /// The causal chain of an event: who proposed, which policy decided, which grant or
    /// approval authorised it, intent, inputs and outputs, back to the run's start.
    Explain(run::ExplainArgs),
    /// Approvals waiting for an operator.
    Approvals(run::ApprovalsArgs),
    /// Approve a waiting request (as operator:NAME); binds to the exact request's digest.
    Approve(run::AnswerArgs),
    /// Deny a waiting request (as operator:NAME).
    Deny(run::AnswerArgs),
    /// Record an operator's reconfiguration of a suspended run, then resume it.
    Reconfigure(run::ReconfigureArgs),
    /// Kill a run (as operator:NAME): it is aborted, and nothing staged is applied.
    Kill(run::KillArgs),
    /// Governed memory: list, show, promote a DOMAIN event of a committed run, and invalidate
    /// (with every memory derived from it), supersede or deprecate a memory.
    Memory(memory::MemoryArgs),
    /// Serve MCP over stdio to one agent: the session is a run of the spec; every tools/call
    /// is governed and recorded; the run commits when the session ends.
    Mcp(gateway::McpArgs),
    /// Serve MCP over streamable HTTP at /mcp, several sessions at once, each its own run.
    Serve(gateway::ServeArgs),
    /// Rebuild a run from the log alone (no network, no model) and report any divergence from
    /// what it recorded; --drive also re-drives its agent from the record and re-makes the
    /// runtime's decisions. Exit 5 if anything diverges.
    Replay(replay::ReplayArgs),
    /// Measure ICE against baselines measured in the same run.
    Bench(bench::BenchArgs),
    /// Tokens for `ice serve` (operators: the HTTP API; agents: MCP at /mcp): `token add
    /// --operator NAME` (or `--agent NAME`) makes one, stores only its SHA-256 in config.toml
    /// and prints it once; `token list` shows them; `token revoke` removes a name's tokens.
    Token(token::TokenArgs),
}

/// Small allocations dominate a governed call (events, payloads, grants); mimalloc serves
/// them markedly faster than the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The async runtime, or why it could not start. Tokio panics instead of failing when the
/// pipe its signal handling needs cannot be made (too few file descriptors left, under a
/// tight `ulimit -n`): that is caught here, quietly, and reported as the error it is.
fn start_runtime() -> Result<tokio::runtime::Runtime, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let built = std::panic::catch_unwind(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    });
    std::panic::set_hook(hook);
    match built {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "it failed".into())),
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`ice log | head`), instead of failing on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Commands ICE runs (`process.exec`, validation checks, MCP tool servers) run as its user:
    // without this, any of them could read ICE's environment (model API keys, log URLs) from
    // /proc/PPID/environ, reach its open files (the real workspace, the log) through
    // /proc/PPID/fd, or attach a debugger. Not dumpable, this process's /proc entries belong
    // to root and ptrace is refused to the same user. (Children get back the default at exec.)
    #[cfg(target_os = "linux")]
    // SAFETY: a prctl with plain integer arguments, before any thread starts.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let cli = Cli::parse();
    let runtime = match start_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let home = home::resolve(cli.home.as_deref());
    let log_url = cli.log.as_deref();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Init { origin, json } => audit::init(&home, origin, json),
            Command::Log(a) => inspect::log(&home, log_url, a).await,
            Command::Show(a) => inspect::show(&home, log_url, a).await,
            Command::Runs(a) => inspect::runs(&home, log_url, a).await,
            Command::Verify(a) => audit::verify(&home, log_url, a).await,
            Command::Checkpoint(a) => audit::checkpoint(&home, log_url, a).await,
            Command::Prove(a) => audit::prove(&home, log_url, a).await,
            Command::VerifyProof(a) => audit::verify_proof(&home, a),
            Command::Migrate(a) => audit::migrate(&home, a).await,
            Command::Policy(a) => policy::run(&home, a),
            Command::Run(a) => run::run(&home, log_url, a).await,
            Command::Diff(a) => run::diff(&home, log_url, a).await,
            Command::Explain(a) => run::explain(&home, log_url, a).await,
            Command::Approvals(a) => run::approvals(&home, log_url, a).await,
            Command::Approve(a) => run::answer(&home, log_url, a, true).await,
            Command::Deny(a) => run::answer(&home, log_url, a, false).await,
            Command::Reconfigure(a) => run::reconfigure(&home, log_url, a).await,
            Command::Kill(a) => run::kill(&home, log_url, a).await,
            Command::Memory(a) => memory::run(&home, log_url, a).await,
            Command::Mcp(a) => gateway::mcp(&home, log_url, a).await,
            Command::Serve(a) => gateway::serve(&home, log_url, a).await,
            Command::Replay(a) => replay::replay(&home, log_url, a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Token(a) => token::run(&home, a),
        }
    });
    // Every command has awaited what it must before returning. A read of stdin that will
    // never finish (`ice mcp` stopped by a signal while its client keeps the pipe open) would
    // otherwise hold the process open: the runtime waits a bounded time for such work.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", bounded_message(&chain_message(&e)));
            // A checkpoint refused because the log does not verify is a verdict on the log.
            let refused = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<ice_log::verify::SignError>(),
                    Some(
                        ice_log::verify::SignError::Refused(_)
                            | ice_log::verify::SignError::Diverged { .. }
                    )
                )
            });
            ExitCode::from(if refused { EXIT_INVALID } else { 1 })
        }
    }
}

/// The most of an error message printed: an error that quotes what it was given (a run id of
/// 100 000 characters) says what was wrong without echoing all of it. Its start and its end
/// (where the reason usually is) are kept.
const MAX_ERROR_CHARS: usize = 2000;

/// An error and its causes, each joined by `: ` (as `{e:#}` does), leaving out a cause whose
/// text the message already ends with: an error that shows its source in its own text (`log:
/// {0}`) and also chains it would otherwise say the same thing twice.
fn chain_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn bounded_message(m: &str) -> std::borrow::Cow<'_, str> {
    let n = m.chars().count();
    if n <= MAX_ERROR_CHARS {
        return std::borrow::Cow::Borrowed(m);
    }
    let keep = MAX_ERROR_CHARS / 2;
    let head: String = m.chars().take(keep).collect();
    let tail: String = m.chars().skip(n - keep).collect();
    let left_out = m.len() - head.len() - tail.len();
    std::borrow::Cow::Owned(format!(
        "{head}… ({left_out} bytes of this message left out) …{tail}"
    ))
}
