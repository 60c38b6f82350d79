//! `sandcore demo`: real calls into the embedded demo guest with their
//! latencies, then a crash, its dump and a restore.
//!
//! Each entry of [`transports`] builds one sandbox, and the latency table
//! gets one column per entry. To compare another call transport, add an
//! entry there; the calls, the table and the crash section need no change.

use std::time::{Duration, Instant};

use clap::Args;
use sandcore::{Sandbox, SandboxBuilder, SandboxError, Transport};

use super::CliError;

/// Time to wait for the crash dump to be written.
#[cfg(feature = "crashdump")]
const DUMP_WAIT: Duration = Duration::from_secs(10);

#[derive(Args)]
#[command(
    after_help = "Crash dumps go to $SANDCORE_CORE_DUMP_DIR, or to the system temp directory if it is unset."
)]
pub struct DemoArgs {
    /// Calls per function for the median latency (sum_to makes a tenth as many).
    #[arg(long, value_name = "COUNT", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub repetitions: u32,
}

/// Input of the `fnv1a` call.
const FNV1A_INPUT: [u8; 4096] = [0x5a; 4096];

/// One way for calls to reach the guest, and a column of the latency table.
struct DemoTransport {
    /// Column heading.
    name: &'static str,
    /// Applies the transport to a builder that already has the guest and host functions.
    configure: fn(SandboxBuilder) -> SandboxBuilder,
}

/// Returns the transports the demo compares. The first one also runs the print and crash sections.
fn transports() -> Vec<DemoTransport> {
    vec![
        DemoTransport {
            name: "exit",
            configure: |builder| builder.transport(Transport::Exit),
        },
        DemoTransport {
            name: "polling",
            configure: |builder| {
                builder.transport(Transport::Polling {
                    idle_spin: std::time::Duration::from_millis(100),
                })
            },
        },
    ]
}

/// One guest call of the latency table.
struct DemoCall {
    /// Text of the call in the output, arguments included.
    label: &'static str,
    /// Makes the call and formats its result.
    call: fn(&mut Sandbox) -> Result<String, SandboxError>,
    /// Divides the repetition count, for calls that do a lot of guest work.
    cost: u32,
}

fn demo_calls() -> Vec<DemoCall> {
    vec![
        DemoCall {
            label: r#"echo("hello from the host")"#,
            call: |sandbox| {
                sandbox
                    .call::<String>("echo", ("hello from the host",))
                    .map(|s| format!("{s:?}"))
            },
            cost: 1,
        },
        DemoCall {
            label: "add(2, 3)",
            call: |sandbox| {
                sandbox
                    .call::<i32>("add", (2i32, 3i32))
                    .map(|v| v.to_string())
            },
            cost: 1,
        },
        DemoCall {
            label: "scale(1.5, 4.0)",
            call: |sandbox| {
                sandbox
                    .call::<f64>("scale", (1.5f64, 4.0f64))
                    .map(|v| v.to_string())
            },
            cost: 1,
        },
        DemoCall {
            label: "fnv1a(<4096 bytes>)",
            call: |sandbox| {
                sandbox
                    .call::<u64>("fnv1a", (&FNV1A_INPUT[..],))
                    .map(|v| format!("{v:#018x}"))
            },
            cost: 1,
        },
        DemoCall {
            label: "sum_to(100000)",
            call: |sandbox| {
                sandbox
                    .call::<u64>("sum_to", (100_000u64,))
                    .map(|v| v.to_string())
            },
            cost: 10,
        },
        DemoCall {
            label: "call_host_add(40, 2)",
            call: |sandbox| {
                sandbox
                    .call::<i64>("call_host_add", (40i64, 2i64))
                    .map(|v| v.to_string())
            },
            cost: 1,
        },
    ]
}

/// Builds a sandbox of the embedded demo guest with `host_add` and a print handler.
fn build_sandbox(transport: &DemoTransport) -> Result<Sandbox, SandboxError> {
    let builder = super::builder_for_guest(None)
        .host_function("host_add", |a: i64, b: i64| a.wrapping_add(b))
        .print_handler(|message| println!("guest: {message}"));
    #[cfg(feature = "crashdump")]
    let builder = builder.dump_worker(&sandcore::dump::DumpWorker::for_directory(None)?);
    (transport.configure)(builder).build()
}

/// Runs `sandcore demo`.
pub fn run(args: &DemoArgs) -> Result<(), CliError> {
    let transports = transports();
    let mut sandboxes = Vec::with_capacity(transports.len());
    for transport in &transports {
        let started = Instant::now();
        let sandbox = build_sandbox(transport).map_err(|error| {
            CliError::Failure(format!(
                "failed to create the {} sandbox: {error}",
                transport.name
            ))
        })?;
        println!(
            "created sandbox {} ({} transport) for the embedded demo guest in {:.1} ms",
            sandbox.id(),
            transport.name,
            started.elapsed().as_secs_f64() * 1e3
        );
        sandboxes.push(sandbox);
    }

    println!();
    print_call_table(&transports, &mut sandboxes, args.repetitions)?;

    let Some(sandbox) = sandboxes.first_mut() else {
        return Err(CliError::Failure("the demo has no transport to run".into()));
    };
    println!();
    let started = Instant::now();
    sandbox
        .call::<()>("print_message", ("hello from the guest",))
        .map_err(|error| call_failed("print_message", &error))?;
    println!("print_message took {:.1} µs", micros(started.elapsed()));

    println!();
    demonstrate_crash(sandbox)
}

/// Prints each call's result and its median latency per transport.
fn print_call_table(
    transports: &[DemoTransport],
    sandboxes: &mut [Sandbox],
    repetitions: u32,
) -> Result<(), CliError> {
    let mut heading = format!("{:<28} {:<22}", "call", "result");
    for transport in transports {
        heading.push_str(&format!(" {:>14}", format!("{} (µs)", transport.name)));
    }
    println!("{heading}");
    println!("{}", "-".repeat(heading.chars().count()));

    for demo_call in demo_calls() {
        let count = (repetitions / demo_call.cost).max(1);
        let mut result = None;
        let mut medians = Vec::with_capacity(sandboxes.len());
        for sandbox in sandboxes.iter_mut() {
            let (value, median) = measure(sandbox, &demo_call, count)?;
            // Every transport calls the same guest, so the results must agree.
            match &result {
                None => result = Some(value),
                Some(first) if *first != value => {
                    return Err(CliError::Failure(format!(
                        "{} returned {first} on one transport and {value} on another",
                        demo_call.label
                    )))
                }
                Some(_) => {}
            }
            medians.push(median);
        }
        let mut line = format!("{:<28} {:<22}", demo_call.label, result.unwrap_or_default());
        for median in medians {
            line.push_str(&format!(" {:>14.1}", micros(median)));
        }
        println!("{line}");
    }
    println!(
        "(median of {repetitions} calls, of {} for sum_to)",
        (repetitions / 10).max(1)
    );
    Ok(())
}

/// Calls `demo_call` `count` times and returns its result and the median latency.
fn measure(
    sandbox: &mut Sandbox,
    demo_call: &DemoCall,
    count: u32,
) -> Result<(String, Duration), CliError> {
    let mut latencies = Vec::with_capacity(count as usize);
    let mut result = String::new();
    for _ in 0..count {
        let started = Instant::now();
        let outcome = (demo_call.call)(sandbox);
        latencies.push(started.elapsed());
        result = outcome.map_err(|error| call_failed(demo_call.label, &error))?;
    }
    latencies.sort_unstable();
    Ok((result, latencies[latencies.len() / 2]))
}

/// Crashes the guest, reports the error and its dump, restores and calls again.
fn demonstrate_crash(sandbox: &mut Sandbox) -> Result<(), CliError> {
    println!("crash_null() writes to address 0:");
    let error = match sandbox.call::<()>("crash_null", ()) {
        Ok(()) => {
            return Err(CliError::Failure(
                "crash_null() returned normally; expected a page fault".into(),
            ))
        }
        Err(error) => error,
    };
    println!("  error: {error}");

    #[cfg(feature = "crashdump")]
    report_dump(&error)?;
    #[cfg(not(feature = "crashdump"))]
    println!("  (built without the crashdump feature, so no dump was written)");

    match sandbox.call::<String>("echo", ("too early",)) {
        Err(error @ SandboxError::Poisoned { .. }) => {
            println!("  next call before restore: {error}")
        }
        Err(error) => return Err(call_failed("echo", &error)),
        Ok(_) => {
            return Err(CliError::Failure(
                "a call after the crash succeeded without restore()".into(),
            ))
        }
    }

    let started = Instant::now();
    sandbox
        .restore()
        .map_err(|error| CliError::Failure(format!("restore() failed: {error}")))?;
    println!("restore() took {:.1} µs", micros(started.elapsed()));

    let reply = sandbox
        .call::<String>("echo", ("alive after restore",))
        .map_err(|error| call_failed("echo after restore", &error))?;
    println!("after restore: echo(\"alive after restore\") = {reply:?}");
    Ok(())
}

/// Waits for the crash dump of `error` and prints its path and the gdb command.
#[cfg(feature = "crashdump")]
fn report_dump(error: &SandboxError) -> Result<(), CliError> {
    let Some(dump_id) = error.dump_id() else {
        return Err(CliError::Failure(format!(
            "the crash queued no dump (error: {error}); see the log above"
        )));
    };
    let worker = sandcore::dump::DumpWorker::for_directory(None)?;
    let Some(receipt) = worker.wait_for(dump_id, DUMP_WAIT) else {
        return Err(CliError::Failure(format!(
            "crash dump {dump_id} was not written within {} s",
            DUMP_WAIT.as_secs()
        )));
    };
    let Some(core) = receipt.file_path() else {
        let errors: Vec<String> = receipt
            .sinks
            .iter()
            .filter_map(|result| {
                result
                    .outcome
                    .as_ref()
                    .err()
                    .map(|error| format!("{}: {error}", result.sink))
            })
            .collect();
        return Err(CliError::Failure(format!(
            "crash dump {dump_id} was not stored ({})",
            errors.join("; ")
        )));
    };
    println!(
        "  crash dump {dump_id}: {} ({} logical, written in {:.1} ms)",
        core.display(),
        super::format_bytes(receipt.bytes),
        receipt.elapsed.as_secs_f64() * 1e3
    );

    let directory = core.parent().unwrap_or(std::path::Path::new("."));
    match super::demo_guest_file(directory) {
        Ok(guest) => println!("  open it in gdb: gdb {} {}", guest.display(), core.display()),
        Err(error) => println!(
            "  failed to write the demo guest next to the dump ({error}); open the dump with: sandcore dumps gdb {}",
            core.display()
        ),
    }
    Ok(())
}

fn call_failed(label: &str, error: &SandboxError) -> CliError {
    CliError::Failure(format!("{label} failed: {error}"))
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
